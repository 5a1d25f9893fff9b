"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): as Qwen2.5-VL, plus DeepStack.

Qwen3-VL's vision tower also returns DeepStack features (one [N_i, D] tensor per item for each
of a few vision layers) that the language model adds to the hidden states at the visual
positions of its first layers. The wrapper keeps the same tokens of those features and hands
them to the language model (``visual_pos_masks`` / ``deepstack_visual_embeds``, arguments of
its public forward) through a forward pre-hook active only while the wrapper runs, since
``Qwen3VLForConditionalGeneration`` computes them only from ``pixel_values``.

A video is one item for the selection (``keep`` per video), although Qwen3-VL writes each of
its temporal groups as its own span after a timestamp: a group may keep few or no tokens; its
timestamp and vision start / end tokens stay.
"""
import contextlib
from typing import List

import torch

from zspaprune_ops.models.base import Family
from zspaprune_ops.models.qwen2_5_vl import Media, ZSPAPruneQwen2_5_VL
from zspaprune_ops.models.sequence import Compaction, PrunedInputs


class ZSPAPruneQwen3VL(ZSPAPruneQwen2_5_VL):
    """ZSPAPrune for ``Qwen3VLForConditionalGeneration`` (arguments as ``ZSPAPruneModel``;
    ``positions`` defaults to ``"original"``)."""

    families = (Family("Qwen3-VL", "qwen3_vl", "Qwen3VLForConditionalGeneration"),)
    inserted_text = r"<\d+(?:\.\d+)? seconds>"  # before each temporal group of a video
    visual_inputs = ("image_grid_thw", "pixel_values_videos", "video_grid_thw",
                     "mm_token_type_ids")

    def _extra_inputs(self, pruned: PrunedInputs, media: List[Media],
                      compact: Compaction) -> None:
        """``visual_pos_masks`` bool [B, L'] and ``deepstack_visual_embeds`` (per DeepStack
        layer, [kept visual tokens, D] in sequence order) of the kept tokens."""
        embeds = pruned.inputs_embeds
        visual = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        layers = {}  # DeepStack layer -> [B, L, D], the features at their placeholders
        for m in media:
            visual |= compact(m.kept_tokens)
            sizes = [f.shape[0] for f in m.features]
            for depth, layer in enumerate(m.encoded.deepstack_features):
                # one tensor per item since transformers 5.2x; one packed tensor before
                parts = torch.split(layer, sizes) if torch.is_tensor(layer) else layer
                if depth not in layers:
                    layers[depth] = embeds.new_zeros(*m.placeholders.shape, embeds.shape[-1])
                layers[depth].masked_scatter_(m.placeholders[..., None],
                                              torch.cat(list(parts)).to(embeds.dtype))
        if layers:
            pruned.model_kwargs = {
                "visual_pos_masks": visual,
                "deepstack_visual_embeds": [compact(layers[d])[visual] for d in sorted(layers)]}

    @contextlib.contextmanager
    def language_inputs(self, pruned: PrunedInputs):
        """Hands the kept DeepStack features to the language model's first call (the prefill)."""
        with super().language_inputs(pruned):
            extra = dict(pruned.model_kwargs)
            if not extra:
                yield
                return
            length = extra["visual_pos_masks"].shape[1]

            def inject(module, args, kwargs):
                handle.remove()
                embeds = kwargs.get("inputs_embeds")
                if embeds is None or embeds.shape[1] != length:
                    raise RuntimeError("the language model's first call is not the pruned "
                                       f"prefill of {length} tokens; cannot place DeepStack "
                                       "features")
                return args, {**kwargs, **extra}

            handle = self.model.model.language_model.register_forward_pre_hook(
                inject, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()


__all__ = ["ZSPAPruneQwen3VL"]
