"""InternVL (``InternVLForConditionalGeneration``: InternVL3 / InternVL3.5 "-hf" checkpoints).

InternVL cuts an image into up to ``max_patches`` tiles plus a thumbnail; each tile gives
``image_seq_length`` visual tokens (pixel-shuffled ViT patches through the projector). The
model receives the tiles of all images flat (``pixel_values`` [tiles, 3, S, S]) with no
per-image tile counts; its processor writes each image as ``<img>`` + one ``<IMG_CONTEXT>``
per token of all its tiles + ``</img>``. So an *item* here is one contiguous run of
``<IMG_CONTEXT>`` placeholders: all tiles and the thumbnail of one image, one selection of
``keep`` tokens over them (a tile may keep few or none). The ``<img>`` / ``</img>`` markers
(token ids only the tokenizer knows) are text: they always stay, around the kept tokens.

A video reaches the model as frames in ``pixel_values``, each frame its own
``Frame<i>: <img>...</img>`` run: each frame is one item (``keep`` per frame).

Positions default to ``"compact"``, as for LLaVA (one position axis).
"""
from typing import List, Optional, Tuple

import torch

from zspaprune_ops.models.base import Family, ZSPAPruneModel
from zspaprune_ops.models.sequence import (Compaction, PrunedInputs, check_text,
                                           describe_value, kept_index_rows, line_positions,
                                           merged_sequence, placeholder_runs)


class ZSPAPruneInternVL(ZSPAPruneModel):
    """ZSPAPrune for ``InternVLForConditionalGeneration`` (arguments as ``ZSPAPruneModel``;
    ``positions`` defaults to ``"compact"``)."""

    families = (Family("InternVL", "internvl", "InternVLForConditionalGeneration"),)
    inserted_text = r"Frame\d+: "  # before each frame of a video
    default_positions = "compact"

    def prune_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None,
                     prompt_mask: Optional[torch.Tensor] = None,
                     padding_side: Optional[str] = None) -> PrunedInputs:
        """Encode the tiles, select ``keep`` tokens per image (all its tiles together), build the
        shortened sequence.

        Args:
            input_ids: int64 [B, L], each image a run of ``<IMG_CONTEXT>`` placeholders
                (``image_seq_length`` per tile) between ``<img>`` and ``</img>``, as the
                processor gives them.
            pixel_values: float [tiles, 3, S, S], the tiles of all images in order.
            attention_mask: [B, L], 1 = real token (default: all real).
            prompt_mask: bool [B, L], True = a token of every image's prompt in its sample
                (placeholders never count). Default: the wrapper's ``prompt`` setting.
            padding_side: ``"left"`` or ``"right"`` for the shortened batch. Default: right if
                the input is right-padded, else left.
        Returns:
            ``PrunedInputs``; ``image_features[i]`` [tiles_i * image_seq_length, D] is image
            i's tiles in order, ``kept_indices`` index into it.
        """
        attention_mask, prompt_mask, padding_side = check_text(input_ids, attention_mask,
                                                               prompt_mask, padding_side)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError("pixel_values must be a [tiles, 3, S, S] tensor, got "
                             f"{describe_value(pixel_values)}")
        config = self.model.config
        placeholders = input_ids == config.image_token_id
        embeds = self.model.get_input_embeddings()(input_ids)
        features, starts = self._image_features(placeholders, pixel_values, embeds.dtype)
        choice = self.choose(input_ids, attention_mask, prompt_mask, embeds, placeholders,
                             features, starts)
        full, keep = merged_sequence(embeds, attention_mask,
                                     [(placeholders, features, choice.kept)])
        compact = Compaction(keep, padding_side, choice.invalid)
        return PrunedInputs(
            compact(full), compact.mask(), line_positions(self.positions, attention_mask, compact),
            kept_index_rows(choice.kept, self.kept_width(features), embeds.device), features)

    def _image_features(self, placeholders, pixel_values, dtype
                        ) -> Tuple[List[torch.Tensor], List[Tuple[int, int]]]:
        """Per image (placeholder run), its tiles' projector outputs [N_i, D]; and each run's
        (sample, first position)."""
        config = self.model.config
        tiles = self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True).pooler_output.to(dtype)
        runs = placeholder_runs(placeholders)
        lengths = [length for _, _, length in runs]
        per_tile = tiles.shape[1]
        if sum(lengths) != tiles.shape[0] * per_tile or any(n % per_tile for n in lengths):
            raise ValueError(f"input_ids hold {sum(lengths)} image tokens in runs of {lengths} but "
                             f"pixel_values give {tiles.shape[0]} tiles of {per_tile} tokens; "
                             "process text and images together")
        features = list(tiles.flatten(0, 1).split(lengths))
        return features, [(sample, start) for sample, start, _ in runs]


__all__ = ["ZSPAPruneInternVL"]
