"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): images and videos.

Candidates of an image: its projector outputs as the model packs them
(``get_image_features``); of a video: its frames' pooled projector outputs
(``get_video_features``). ``keep`` is per image and per video (all its frames together: one
selection lets the diversity fill drop the frames' repeats).

The image-newline vector stands where LLaVA-NeXT's does and more: closing each row of an
any-resolution image's unpadded grid (after its base tile), once after a base-only image (a
sample with several images: ``batch_num_images``), once after a whole video. It is treated as
LLaVA-NeXT's: never a candidate; an item with at most its budget of tokens stays whole,
newlines included; a larger one loses its newlines and keeps ``keep`` of its other tokens.

The model's packing depends on ``batch_num_images`` and ``image_sizes`` (without
``batch_num_images`` every image is taken for an any-resolution one): pass what the processor
returns, as to the model itself.

Positions default to ``"compact"``, as for LLaVA.
"""
from typing import List, Optional

import torch

from zspaprune_ops.choice import candidates_without
from zspaprune_ops.models.base import Family, ZSPAPruneModel
from zspaprune_ops.models.sequence import (Compaction, PrunedInputs, check_text,
                                           describe_value, item_starts, kept_index_rows,
                                           line_positions, merged_sequence)


class ZSPAPruneLlavaOnevision(ZSPAPruneModel):
    """ZSPAPrune for ``LlavaOnevisionForConditionalGeneration`` (arguments as
    ``ZSPAPruneModel``; ``positions`` defaults to ``"compact"``)."""

    families = (Family("LLaVA-OneVision", "llava_onevision",
                       "LlavaOnevisionForConditionalGeneration"),)
    default_positions = "compact"
    visual_inputs = ("image_sizes", "batch_num_images", "pixel_values_videos",
                     "image_sizes_videos")

    def prune_inputs(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                     attention_mask: Optional[torch.Tensor] = None, *,
                     image_sizes: Optional[torch.Tensor] = None,
                     batch_num_images: Optional[torch.Tensor] = None,
                     pixel_values_videos: Optional[torch.Tensor] = None,
                     image_sizes_videos=None, prompt_mask: Optional[torch.Tensor] = None,
                     padding_side: Optional[str] = None) -> PrunedInputs:
        """Encode images and videos, select ``keep`` tokens per image and per video, build the
        shortened sequence.

        Args:
            input_ids: int64 [B, L], one ``<image>`` / ``<video>`` placeholder per visual token,
                as the processor gives them.
            pixel_values: float [num_images, tiles, 3, S, S] (padded tiles) or [tiles, 3, S, S];
                image_sizes: int [num_images, 2] (height, width), required with images;
                batch_num_images: int [B], images per sample (as the processor returns it;
                None: every image is an any-resolution one, as in the model).
            pixel_values_videos: float [num_videos, frames, 3, S, S];
                image_sizes_videos: accepted for the processor's sake (unused, as in the model).
            attention_mask: [B, L], 1 = real token (default: all real).
            prompt_mask: bool [B, L], True = a token of every item's prompt in its sample
                (placeholders never count). Default: the wrapper's ``prompt`` setting.
            padding_side: ``"left"`` or ``"right"`` for the shortened batch. Default: right if
                the input is right-padded, else left.
        """
        attention_mask, prompt_mask, padding_side = check_text(input_ids, attention_mask,
                                                               prompt_mask, padding_side)
        config = self.model.config
        embeds = self.model.get_input_embeddings()(input_ids)
        images = input_ids == config.image_token_id
        videos = input_ids == config.video_token_id
        image_features = self._image_features(images, pixel_values, image_sizes,
                                              batch_num_images, embeds.dtype)
        video_features = self._video_features(videos, pixel_values_videos, embeds.dtype)
        features = image_features + video_features
        starts = (item_starts(images, image_features, "image")
                  + item_starts(videos, video_features, "video"))
        newline = self.model.model.image_newline
        candidates = [candidates_without(f, newline) for f in features]
        choice = self.choose(input_ids, attention_mask, prompt_mask, embeds, images | videos,
                             features, starts, candidates)
        kept_images = choice.kept[:len(image_features)]
        kept_videos = choice.kept[len(image_features):]
        full, keep = merged_sequence(embeds, attention_mask,
                                     [(images, image_features, kept_images),
                                      (videos, video_features, kept_videos)])
        compact = Compaction(keep, padding_side, choice.invalid)
        pruned = PrunedInputs(
            compact(full), compact.mask(), line_positions(self.positions, attention_mask, compact),
            kept_index_rows(kept_images, self.kept_width(image_features), embeds.device),
            image_features)
        if video_features:
            pruned.kept_video_indices = kept_index_rows(
                kept_videos, self.kept_width(video_features), embeds.device)
            pruned.video_features = video_features
        return pruned

    def _image_features(self, placeholders, pixel_values, image_sizes, batch_num_images,
                        dtype) -> List[torch.Tensor]:
        """Per image, its packed projector outputs [N_i, D] (newlines included); [] without
        images."""
        if pixel_values is None:
            if bool(placeholders.any()):
                raise ValueError("input_ids hold image placeholders but pixel_values is None")
            return []
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got "
                            f"{describe_value(pixel_values)}")
        if image_sizes is None:
            raise ValueError("image_sizes is required with pixel_values (the processor returns "
                             "it, with batch_num_images)")
        config = self.model.config
        out = self.model.get_image_features(
            pixel_values, image_sizes, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio, batch_num_images=batch_num_images,
            return_dict=True)
        return [f.to(dtype) for f in out.pooler_output]

    def _video_features(self, placeholders, pixel_values_videos, dtype) -> List[torch.Tensor]:
        """Per video, its frames' pooled projector outputs then one newline, [N_v, D]; [] without
        videos."""
        if pixel_values_videos is None:
            if bool(placeholders.any()):
                raise ValueError("input_ids hold video placeholders but pixel_values_videos is "
                                 "None")
            return []
        if not isinstance(pixel_values_videos, torch.Tensor) or pixel_values_videos.dim() != 5:
            raise ValueError("pixel_values_videos must be a [videos, frames, 3, S, S] tensor, "
                             f"got {describe_value(pixel_values_videos)}")
        config = self.model.config
        out = self.model.get_video_features(
            pixel_values_videos, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True).pooler_output
        newline = self.model.model.image_newline.to(out)
        if not torch.equal(out[0, -1], newline):  # transformers < 5.2x appends it in forward
            out = torch.cat([out, newline.expand(out.shape[0], 1, -1)], dim=1)
        return [f.to(dtype) for f in out]


__all__ = ["ZSPAPruneLlavaOnevision"]
