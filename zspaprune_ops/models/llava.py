"""LLaVA and LLaVA-NeXT (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``).

The wrapper uses only the model's public pieces (``get_image_features``,
``get_input_embeddings``, ``config.image_token_id``, ``generate`` / ``forward`` with
``inputs_embeds``). Candidates of an image: its projector outputs.

LLaVA-NeXT's image-newline tokens (one learned vector closing each row of the AnyRes grid) are
never candidates: they carry no image content, and as identical copies they would tie in
relevance and fill the relevance core with duplicates. An image with at most ``keep``
placeholder tokens is left whole, newlines included (so ``keep`` >= every image's token count
reproduces the unpruned model exactly). A larger image is pruned: its newlines are dropped,
because the grid rows they delimit no longer exist, and ``keep`` of its other tokens are kept
(all of them if it has fewer).

Positions default to ``"compact"`` (counted over the shortened sequence), what this wrapper
has always done and what ``generate`` derives from an attention mask.
"""
from typing import List, Optional

import torch

from zspaprune_ops.choice import candidates_without
from zspaprune_ops.models.base import Family, ZSPAPruneModel
from zspaprune_ops.models.sequence import (Compaction, PrunedInputs, check_text,
                                           describe_value, item_starts, kept_index_rows,
                                           kept_placeholders, position_ids_from_mask)


class ZSPAPruneLlava(ZSPAPruneModel):
    """ZSPAPrune for ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``
    (arguments as ``ZSPAPruneModel``; ``positions`` defaults to ``"compact"``)."""

    families = (Family("LLaVA-1.5", "llava", "LlavaForConditionalGeneration"),
                Family("LLaVA-NeXT", "llava_next", "LlavaNextForConditionalGeneration"))
    default_positions = "compact"
    visual_inputs = ("image_sizes",)

    @property
    def is_next(self) -> bool:
        return any(base.__name__ == "LlavaNextForConditionalGeneration"
                   for base in type(self.model).__mro__)

    def prune_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                     attention_mask: Optional[torch.Tensor] = None,
                     image_sizes: Optional[torch.Tensor] = None,
                     prompt_mask: Optional[torch.Tensor] = None,
                     padding_side: Optional[str] = None) -> PrunedInputs:
        """Encode the images, select ``keep`` tokens per image, build the shortened sequence.

        Args:
            input_ids: int64 [B, L] with one ``<image>`` placeholder per visual token, as the
                processor gives them.
            pixel_values: as the processor gives them ([num_images, 3, H, W] for LLaVA,
                [num_images, tiles, 3, H, W] for LLaVA-NeXT).
            attention_mask: [B, L], 1 = real token (default: all real).
            image_sizes: int [num_images, 2] (LLaVA-NeXT only; required there).
            prompt_mask: bool [B, L], True = token that forms the prompt vector of every image
                of its sample (image placeholders never count). Default: the wrapper's
                ``prompt`` setting (the user message holding each image).
            padding_side: ``"left"`` or ``"right"`` for the shortened batch (rows lose different
                counts). Default: right if the input is right-padded, else left.
        """
        attention_mask, prompt_mask, padding_side = check_text(input_ids, attention_mask,
                                                               prompt_mask, padding_side)
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError("pixel_values must be a torch.Tensor, got "
                            f"{describe_value(pixel_values)}")
        if self.is_next and image_sizes is None:
            raise ValueError("image_sizes is required for LLaVA-NeXT (the processor returns it)")
        placeholders = input_ids == self.model.config.image_token_id
        embeds = self.model.get_input_embeddings()(input_ids)
        features = [f.to(embeds.dtype) for f in self._image_features(pixel_values, image_sizes)]
        starts = item_starts(placeholders, features)
        candidates = [self._content(f) for f in features]
        choice = self.choose(input_ids, attention_mask, prompt_mask, embeds, placeholders,
                             features, starts, candidates)
        keep = attention_mask.bool() & (~placeholders | kept_placeholders(placeholders, features,
                                                                          choice.kept))
        full = embeds.masked_scatter(placeholders[..., None], torch.cat(features))
        compact = Compaction(keep, padding_side, choice.invalid)
        mask = compact.mask()
        if self.positions == "original":
            positions = compact.positions(position_ids_from_mask(attention_mask))
        else:
            positions = position_ids_from_mask(mask)
        return PrunedInputs(compact(full), mask, positions,
                            kept_index_rows(choice.kept, self.kept_width(features), embeds.device),
                            features)

    def _image_features(self, pixel_values, image_sizes) -> List[torch.Tensor]:
        """Projector outputs per image, [N_i, D] each (LLaVA-NeXT: packed, newlines included)."""
        config = self.model.config
        options = dict(vision_feature_layer=config.vision_feature_layer,
                       vision_feature_select_strategy=config.vision_feature_select_strategy,
                       return_dict=True)
        if self.is_next:
            out = self.model.get_image_features(pixel_values, image_sizes, **options)
        else:
            out = self.model.get_image_features(pixel_values=pixel_values, **options)
        return list(out.pooler_output)

    def _content(self, feature: torch.Tensor) -> Optional[torch.Tensor]:
        """bool [N]: an image's candidates: all but LLaVA-NeXT's image-newline tokens (None:
        all of them)."""
        newline = getattr(self.model.model, "image_newline", None) if self.is_next else None
        return candidates_without(feature, newline)


__all__ = ["ZSPAPruneLlava", "PrunedInputs", "position_ids_from_mask"]
