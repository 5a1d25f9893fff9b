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
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from zspaprune_ops.models.base import Family, ZSPAPruneModel
from zspaprune_ops.models.sequence import (Compaction, PrunedInputs, check_text,
                                           describe_value, item_starts, kept_index_rows,
                                           kept_placeholders, position_ids_from_mask)

IMAGE, VIDEO = 1, 2  # mm_token_type_ids (0: text), as Qwen's processors write them


@dataclass
class Media:
    """The images or the videos of a batch: ``name`` ("image" / "video"), ``placeholders``
    bool [B, L], ``features`` [N_i, D] per item, the vision tower's ``encoded`` output; once
    chosen, ``kept`` (indices per item) and ``kept_tokens`` (bool [B, L]: kept placeholders)."""

    name: str
    placeholders: torch.Tensor
    features: List[torch.Tensor]
    encoded: object
    kept: List[torch.Tensor] = field(default_factory=list)
    kept_tokens: Optional[torch.Tensor] = None


class ZSPAPruneQwen2_5_VL(ZSPAPruneModel):
    """ZSPAPrune for ``Qwen2_5_VLForConditionalGeneration`` (arguments as ``ZSPAPruneModel``;
    ``positions`` defaults to ``"original"``)."""

    families = (Family("Qwen2.5-VL", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),)
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
            prompt_mask: bool [B, L], True = token that forms the prompt vector of every item
                of its sample (placeholders never count). Default: the wrapper's ``prompt``
                setting (the user message holding each image or video).
            padding_side: ``"left"`` or ``"right"`` for the shortened batch. Default: right if
                the input is right-padded, else left.
        """
        attention_mask, prompt_mask, padding_side = check_text(input_ids, attention_mask,
                                                               prompt_mask, padding_side)
        embeds = self.model.get_input_embeddings()(input_ids)
        images = self._media("image", input_ids, pixel_values, image_grid_thw, embeds.dtype)
        videos = self._media("video", input_ids, pixel_values_videos, video_grid_thw,
                             embeds.dtype)
        media = [m for m in (images, videos) if m is not None]
        features = [f for m in media for f in m.features]
        starts = [s for m in media for s in item_starts(m.placeholders, m.features, m.name)]
        config = self.model.config
        type_ids = IMAGE * (input_ids == config.image_token_id).long() + \
            VIDEO * (input_ids == config.video_token_id).long()
        placeholders = type_ids > 0
        choice = self.choose(input_ids, attention_mask, prompt_mask, embeds, placeholders,
                             features, starts)
        keep, full, first = ~placeholders, embeds, 0
        for m in media:
            m.kept = choice.kept[first:first + len(m.features)]
            m.kept_tokens = kept_placeholders(m.placeholders, m.features, m.kept)
            keep = keep | m.kept_tokens
            full = full.masked_scatter(m.placeholders[..., None], torch.cat(m.features))
            first += len(m.features)
        compact = Compaction(keep & attention_mask.bool(), padding_side, choice.invalid)
        mask = compact.mask()
        if self.positions == "original":
            rope = dict(image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                        attention_mask=attention_mask)
            if second_per_grid_ts is not None:
                rope["second_per_grid_ts"] = second_per_grid_ts
            original, _ = self.model.model.get_rope_index(input_ids, type_ids, **rope)
            positions = compact.positions(original)
        else:
            positions = position_ids_from_mask(mask)[None].expand(3, -1, -1)
        deltas = positions.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1 - mask.sum(1)
        pruned = PrunedInputs(compact(full), mask, positions, rope_deltas=deltas[:, None],
                              kept_indices=kept_index_rows(
                                  images.kept if images else [],
                                  self.kept_width(images.features if images else []),
                                  embeds.device),
                              image_features=images.features if images else [])
        if videos is not None:
            pruned.kept_video_indices = kept_index_rows(videos.kept,
                                                        self.kept_width(videos.features),
                                                        embeds.device)
            pruned.video_features = videos.features
        self._extra_inputs(pruned, media, compact)
        return pruned

    def _media(self, name, input_ids, pixels, grid, dtype) -> Optional["Media"]:
        """Encode the images or the videos (None if there are none)."""
        token_id = getattr(self.model.config, f"{name}_token_id")
        pixels_name = "pixel_values" if name == "image" else "pixel_values_videos"
        if pixels is None:
            if bool((input_ids == token_id).any()):
                raise ValueError(f"input_ids hold {name} placeholders but {pixels_name} is None")
            return None
        if not isinstance(pixels, torch.Tensor) or not isinstance(grid, torch.Tensor):
            raise TypeError(f"{pixels_name} and {name}_grid_thw must be tensors, got "
                            f"{describe_value(pixels)} and {describe_value(grid)}")
        encode = self.model.get_image_features if name == "image" else \
            self.model.get_video_features
        encoded = encode(pixels, grid, return_dict=True)
        return Media(name, input_ids == token_id,
                     [f.to(dtype) for f in encoded.pooler_output], encoded)

    def _extra_inputs(self, pruned: PrunedInputs, media: List["Media"],
                      compact: Compaction) -> None:
        """Further language-model inputs for ``pruned.model_kwargs`` (none for Qwen2.5-VL)."""

    def language_inputs(self, pruned: PrunedInputs):
        """Sets the model's ``rope_deltas`` to the pruned sequence's, so that a later forward
        with a cache and no ``position_ids`` continues from the right position."""
        self.model.model.rope_deltas = pruned.rope_deltas
        return super().language_inputs(pruned)


__all__ = ["ZSPAPruneQwen2_5_VL"]
