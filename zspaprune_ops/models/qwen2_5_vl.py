"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): images and videos, M-RoPE positions.

Candidates of an image or a video: its merged visual tokens (``get_image_features`` /
``get_video_features``: the vision merger's outputs, in the LLM's space). ``keep`` is per image
and per *video* (all its frames together, not per temporal group): a video's frames repeat
much of their content, and one selection over the whole video lets the diversity fill drop
those repeats instead of keeping ``keep`` near-copies per frame pair; it also gives ``keep``
the same meaning on Qwen3-VL, where each temporal group is a separate span.

Positions (``positions="original"``, the default): the model's own ``get_rope_index`` on the
unpruned sequence, then each kept token keeps its (temporal, height, width) position; text
after an image keeps its original positions, and generation continues from the last token's
position + 1, as the unpruned model's ``generate`` does. ``"compact"``: the shortened sequence
is numbered like text (all three axes equal, 0, 1, 2, ...).
"""
from typing import List, Optional

import torch

from zspaprune_ops.models.base import ZSPAPruneModel
from zspaprune_ops.models.sequence import (Compaction, PrunedInputs, check_text, choose,
                                           describe, item_samples, kept_index_rows,
                                           kept_placeholders, position_ids_from_mask)

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids, as Qwen's processors write them


class ZSPAPruneQwen2_5_VL(ZSPAPruneModel):
    """ZSPAPrune for ``Qwen2_5_VLForConditionalGeneration`` (arguments as ``ZSPAPruneModel``;
    ``positions`` defaults to ``"original"``)."""

    model_class_names = ("Qwen2_5_VLForConditionalGeneration",)
    default_positions = "original"
    visual_inputs = ("image_grid_thw", "pixel_values_videos", "video_grid_thw",
                     "second_per_grid_ts", "mm_token_type_ids")

    def prune_inputs(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                     attention_mask: Optional[torch.Tensor] = None, *,
                     image_grid_thw: Optional[torch.Tensor] = None,
                     pixel_values_videos: Optional[torch.Tensor] = None,
                     video_grid_thw: Optional[torch.Tensor] = None,
                     second_per_grid_ts: Optional[torch.Tensor] = None,
                     mm_token_type_ids: Optional[torch.Tensor] = None,
                     prompt_mask: Optional[torch.Tensor] = None,
                     padding_side: Optional[str] = None) -> PrunedInputs:
        """Encode images and videos, select ``keep`` tokens per image and per video, build the
        shortened sequence and its positions.

        Args:
            input_ids: int64 [B, L] with one placeholder per merged visual token (``<|image_pad|>``
                / ``<|video_pad|>``), as the processor gives them.
            pixel_values, image_grid_thw: the images, as the processor gives them.
            pixel_values_videos, video_grid_thw, second_per_grid_ts: the videos, likewise.
            attention_mask: [B, L], 1 = real token (default: all real).
            mm_token_type_ids: accepted for the processor's sake; recomputed from input_ids.
            prompt_mask: bool [B, L], True = token that forms the prompt vector. Default: every
                real text token (system prompt and chat-template tokens included); image and
                video placeholders never count.
            padding_side: ``"left"`` or ``"right"`` for the shortened batch. Default: right if
                the input is right-padded, else left.
        """
        attention_mask, prompt_mask, padding_side = check_text(input_ids, attention_mask,
                                                               prompt_mask, padding_side)
        config = self.model.config
        embeds = self.model.get_input_embeddings()(input_ids)
        media = []  # (token type, placeholders [B, L], features per item, raw encoder output)
        for kind, pixels, grid, token_id in (
                (IMAGE, pixel_values, image_grid_thw, config.image_token_id),
                (VIDEO, pixel_values_videos, video_grid_thw, config.video_token_id)):
            name = "image" if kind == IMAGE else "video"
            if pixels is None:
                continue
            grid_name = f"{name}_grid_thw"
            if not isinstance(pixels, torch.Tensor) or not isinstance(grid, torch.Tensor):
                raise TypeError(f"{'pixel_values' if kind == IMAGE else 'pixel_values_videos'} "
                                f"and {grid_name} must be tensors, got {describe(pixels)} and "
                                f"{describe(grid)}")
            encoded = self._encode(kind, pixels, grid)
            features = [f.to(embeds.dtype) for f in encoded.pooler_output]
            media.append((kind, input_ids == token_id, features, encoded))
        for kind, token_id in ((IMAGE, config.image_token_id), (VIDEO, config.video_token_id)):
            if kind not in [m[0] for m in media] and bool((input_ids == token_id).any()):
                name = "pixel_values" if kind == IMAGE else "pixel_values_videos"
                raise ValueError(f"input_ids hold {'image' if kind == IMAGE else 'video'} "
                                 f"placeholders but {name} is None")
        placeholders = torch.zeros_like(input_ids, dtype=torch.bool)
        features, samples = [], []
        for kind, mask, items, _ in media:
            samples += item_samples(mask, items, "image" if kind == IMAGE else "video")
            features += items
            placeholders |= mask
        prompt_mask = prompt_mask & attention_mask.bool() & ~placeholders
        choice = choose(features, [None] * len(features), self.keep, embeds, prompt_mask,
                        samples, self._select)
        keep = ~placeholders
        full, first = embeds, 0
        for _, mask, items, _ in media:
            kept = choice.kept[first:first + len(items)]
            keep = keep | kept_placeholders(mask, items, kept)
            full = full.masked_scatter(mask[..., None], torch.cat(items))
            first += len(items)
        keep &= attention_mask.bool()
        compact = Compaction(keep, padding_side, choice.invalid)
        mask = compact.mask()
        if self.positions == "original":
            type_ids = (input_ids == config.image_token_id).long() * IMAGE + \
                (input_ids == config.video_token_id).long() * VIDEO
            rope = dict(image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                        attention_mask=attention_mask)
            if second_per_grid_ts is not None:
                rope["second_per_grid_ts"] = second_per_grid_ts
            original, _ = self.model.model.get_rope_index(input_ids, type_ids, **rope)
            positions = compact.positions(original)
        else:
            positions = position_ids_from_mask(mask)[None].expand(3, -1, -1)
        deltas = positions.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1 - mask.sum(1)
        images = [m for m in media if m[0] == IMAGE]
        videos = [m for m in media if m[0] == VIDEO]
        n_images = len(images[0][2]) if images else 0
        pruned = PrunedInputs(
            compact(full), mask, positions,
            kept_index_rows(choice.kept[:n_images], self.keep, embeds.device),
            images[0][2] if images else [], rope_deltas=deltas[:, None])
        if videos:
            pruned.kept_video_indices = kept_index_rows(choice.kept[n_images:], self.keep,
                                                        embeds.device)
            pruned.video_features = videos[0][2]
        self._extra_inputs(pruned, media, choice.kept, compact)
        return pruned

    def _encode(self, kind: int, pixels: torch.Tensor, grid: torch.Tensor):
        """The vision tower's output for images or videos (``pooler_output``: per item)."""
        if kind == IMAGE:
            return self.model.get_image_features(pixels, grid, return_dict=True)
        return self.model.get_video_features(pixels, grid, return_dict=True)

    def _extra_inputs(self, pruned: PrunedInputs, media, kept: List[torch.Tensor],
                      compact: Compaction) -> None:
        """Further language-model inputs for ``pruned.model_kwargs`` (none for Qwen2.5-VL)."""

    def language_inputs(self, pruned: PrunedInputs):
        """Sets the model's ``rope_deltas`` to the pruned sequence's, so that a later forward
        with a cache and no ``position_ids`` continues from the right position."""
        self.model.model.rope_deltas = pruned.rope_deltas
        return super().language_inputs(pruned)


__all__ = ["ZSPAPruneQwen2_5_VL"]
