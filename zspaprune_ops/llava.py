"""ZSPAPrune for stock Hugging Face LLaVA / LLaVA-NeXT models: prune the visual tokens, then run.

    from zspaprune_ops.llava import ZSPAPruneLlava
    model = ZSPAPruneLlava.from_pretrained("llava-hf/llava-1.5-7b-hf", keep=64)
    new_tokens = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))

The wrapper uses only the model's public pieces (``get_image_features``,
``get_input_embeddings``, ``config.image_token_id``, ``generate`` / ``forward`` with
``inputs_embeds``): no patching of transformers. It runs the vision tower and projector once,
picks ``keep`` tokens per image with ``torch.ops.zspaprune.select`` (prompt = the image's
sample's text tokens) and hands the language model a shortened sequence in which each image's
placeholder span holds only its kept tokens, in their original order.

LLaVA-NeXT's image-newline tokens (one learned vector closing each row of the AnyRes grid) are
never candidates: they carry no image content, and as identical copies they would tie in
relevance and fill the relevance core with duplicates. An image with at most ``keep``
placeholder tokens is left whole, newlines included (so ``keep`` >= every image's token count
reproduces the unpruned model exactly). A larger image is pruned: its newlines are dropped,
because the grid rows they delimit no longer exist, and ``keep`` of its other tokens are kept
(all of them if it has fewer).
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

try:
    from transformers import (AutoModelForImageTextToText, LlavaForConditionalGeneration,
                              LlavaNextForConditionalGeneration)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.llava needs Hugging Face transformers: "
                      "pip install zspaprune[hf]") from error

import zspaprune_ops
from zspaprune_ops._validate import check_budget
from zspaprune_ops.dispatch import BACKENDS

_MODEL_CLASSES = {"llava": LlavaForConditionalGeneration,
                  "llava_next": LlavaNextForConditionalGeneration}
PADDING_SIDES = ("left", "right")


@dataclass
class PrunedInputs:
    """The shortened sequence handed to the language model.

    inputs_embeds: [B, L', D] in the model's embedding dtype; padding slots are zeros.
    attention_mask: int64 [B, L'], 1 = real token.
    kept_indices: int64 [num_images, keep]: per image (batch order), the kept positions within
        its placeholder span, ascending; rows of images keeping fewer tokens end in -1.
    image_features: the projector outputs per image, [N_i, D] each (the candidates).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    kept_indices: torch.Tensor
    image_features: List[torch.Tensor]

    @property
    def position_ids(self) -> torch.Tensor:
        """int64 [B, L']: positions counted over real tokens, as ``generate`` computes them."""
        return position_ids_from_mask(self.attention_mask)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1``, 0 at padding: the positions HF's ``generate`` derives."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class ZSPAPruneLlava(torch.nn.Module):
    """A ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` that keeps
    only ``keep`` visual tokens per image, chosen by ZSPAPrune.

    Args:
        model: the loaded Hugging Face model (any dtype, device and attention implementation).
        keep: visual tokens kept per image (>= 1); an image with fewer keeps them all.
        relevance_ratio: share of ``keep`` chosen by prompt relevance, in [0, 1].
        backend: ``"auto"`` calls ``torch.ops.zspaprune.select``; any other backend of
            ``zspaprune_ops.select`` (e.g. ``"reference"``) goes through that wrapper.
    """

    def __init__(self, model, keep: int = 64, relevance_ratio: float = 0.5,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(model, tuple(_MODEL_CLASSES.values())):
            raise TypeError("model must be a LlavaForConditionalGeneration or "
                            f"LlavaNextForConditionalGeneration, got {type(model).__name__}")
        check_budget(keep, relevance_ratio)
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model
        self.keep = keep
        self.relevance_ratio = float(relevance_ratio)
        self.backend = backend
        self.is_next = isinstance(model, LlavaNextForConditionalGeneration)

    @classmethod
    def from_pretrained(cls, path, keep: int = 64, relevance_ratio: float = 0.5,
                        backend: str = "auto", **hf_kwargs) -> "ZSPAPruneLlava":
        """Load a LLaVA or LLaVA-NeXT checkpoint (``hf_kwargs`` go to its ``from_pretrained``,
        e.g. ``dtype``, ``device_map``, ``attn_implementation``)."""
        model = AutoModelForImageTextToText.from_pretrained(path, **hf_kwargs)
        return cls(model.eval(), keep, relevance_ratio, backend)

    # ---------------------------------------------------------------- public entry points
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
            prompt_mask: bool [B, L], True = token that forms the prompt vector. Default: every
                real non-image token. Image placeholders never count.
            padding_side: ``"left"`` or ``"right"`` for the shortened batch (rows lose different
                counts). Default: right if the input is right-padded, else left.
        """
        embed_layer = self.model.get_input_embeddings()
        input_ids, attention_mask, prompt_mask = self._check_text(
            input_ids, pixel_values, attention_mask, prompt_mask, image_sizes)
        if padding_side is None:
            right = bool((attention_mask[:, -1] == 0).any()) and bool(attention_mask[:, 0].all())
            padding_side = "right" if right else "left"
        elif padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        placeholders = input_ids == self.model.config.image_token_id
        embeds = embed_layer(input_ids)
        features = [f.to(embeds.dtype) for f in self._image_features(pixel_values, image_sizes)]
        image_sample = _image_samples(placeholders, features)
        prompt_mask = prompt_mask & attention_mask.bool() & ~placeholders
        kept = self._choose(features, embeds, prompt_mask, image_sample)
        inputs_embeds, mask = _shortened_sequence(embeds, placeholders, attention_mask, features,
                                                  kept, padding_side)
        kept_indices = torch.full((len(features), self.keep), -1, dtype=torch.int64,
                                  device=embeds.device)
        for row, indices in enumerate(kept):
            kept_indices[row, :indices.numel()] = indices
        return PrunedInputs(inputs_embeds, mask, kept_indices, features)

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                image_sizes: Optional[torch.Tensor] = None,
                prompt_mask: Optional[torch.Tensor] = None, **model_kwargs):
        """The wrapped model's forward on the pruned sequence; its output (``logits`` [B, L', V]
        for the shortened sequence). ``model_kwargs`` go to the model's forward."""
        _reject_unpruned_kwargs(model_kwargs)
        if pixel_values is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
        pruned = self.prune_inputs(input_ids, pixel_values, attention_mask, image_sizes,
                                   prompt_mask)
        return self.model(inputs_embeds=pruned.inputs_embeds,
                          attention_mask=pruned.attention_mask,
                          position_ids=pruned.position_ids, **model_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 image_sizes: Optional[torch.Tensor] = None,
                 prompt_mask: Optional[torch.Tensor] = None, **generate_kwargs) -> torch.Tensor:
        """Prune, then the model's ``generate``; returns only the new tokens, int64 [B, new].

        The shortened batch is left-padded, so right-padded inputs generate correctly too.
        """
        _reject_unpruned_kwargs(generate_kwargs)
        if pixel_values is None:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      **generate_kwargs)
            return out[:, input_ids.shape[1]:]
        pruned = self.prune_inputs(input_ids, pixel_values, attention_mask, image_sizes,
                                   prompt_mask, padding_side="left")
        return self.model.generate(inputs_embeds=pruned.inputs_embeds,
                                   attention_mask=pruned.attention_mask, **generate_kwargs)

    # ---------------------------------------------------------------- internals
    def _check_text(self, input_ids, pixel_values, attention_mask, prompt_mask, image_sizes):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64,
                                                                              torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {_describe(input_ids)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got {_describe(input_ids)}")
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {_describe(pixel_values)}")
        if self.is_next and image_sizes is None:
            raise ValueError("image_sizes is required for LLaVA-NeXT (the processor returns it)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_mask is None:
            prompt_mask = torch.ones_like(input_ids, dtype=torch.bool)
        for name, mask in (("attention_mask", attention_mask), ("prompt_mask", prompt_mask)):
            if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
                raise ValueError(f"{name} must be a tensor of shape {list(input_ids.shape)} "
                                 f"like input_ids, got {_describe(mask)}")
        if prompt_mask.dtype != torch.bool:
            raise TypeError(f"prompt_mask must be a bool tensor, got {prompt_mask.dtype}")
        return input_ids, attention_mask, prompt_mask

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

    def _newlines(self, feature: torch.Tensor) -> Optional[torch.Tensor]:
        """bool [N]: LLaVA-NeXT's image-newline tokens in an image's features (None for LLaVA)."""
        newline = getattr(self.model.model, "image_newline", None) if self.is_next else None
        if newline is None:
            return None
        return (feature == newline.to(feature)).all(dim=-1)

    def _choose(self, features, embeds, prompt_mask, image_sample) -> List[torch.Tensor]:
        """Kept positions per image (int64, ascending): whole images, then one op call for the
        images to prune (padded with ``visual_mask`` when their candidate counts differ)."""
        kept: List[Optional[torch.Tensor]] = []
        to_prune, candidate_masks = [], []
        for image, feature in enumerate(features):
            n = feature.shape[0]
            newlines = self._newlines(feature) if n > self.keep else None
            if n <= self.keep:
                kept.append(torch.arange(n, device=feature.device))
            elif newlines is not None and n - int(newlines.sum()) <= self.keep:
                kept.append((~newlines).nonzero().squeeze(1))
            else:
                kept.append(None)
                to_prune.append(image)
                candidate_masks.append(None if newlines is None else ~newlines)
        if to_prune:
            visual, visual_mask = _pad_rows([features[i] for i in to_prune], candidate_masks)
            samples = image_sample[to_prune]
            picks = self._select(visual, embeds[samples], prompt_mask[samples], visual_mask)
            for image, row in zip(to_prune, picks):
                kept[image] = row
        return kept

    def _select(self, visual, prompt, prompt_mask, visual_mask) -> torch.Tensor:
        """ZSPAPrune on [M, N, D] candidates: int64 [M, keep] (the op, or the chosen backend)."""
        if self.backend == "auto":
            return torch.ops.zspaprune.select(visual, prompt, self.keep, self.relevance_ratio,
                                              prompt_mask, visual_mask)
        return zspaprune_ops.select(visual, prompt, self.keep, self.relevance_ratio,
                                    prompt_mask=prompt_mask, visual_mask=visual_mask,
                                    backend=self.backend)


def _reject_unpruned_kwargs(kwargs) -> None:
    for name in ("inputs_embeds", "position_ids", "labels", "past_key_values", "cache"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} refers to the unpruned sequence and is not supported by "
                             "ZSPAPruneLlava; call prune_inputs() and the model directly")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


def _image_samples(placeholders: torch.Tensor, features) -> torch.Tensor:
    """int64 [num_images]: the sample each image belongs to (images fill placeholders in order)."""
    per_sample = placeholders.sum(dim=1).tolist()
    counts = [f.shape[0] for f in features]
    if sum(per_sample) != sum(counts):
        raise ValueError(f"input_ids hold {sum(per_sample)} image tokens but the images give "
                         f"{sum(counts)} features ({counts}); process text and images together")
    samples, image, filled = [], 0, 0
    for sample, tokens in enumerate(per_sample):
        while filled < tokens:
            filled += counts[image]
            samples.append(sample)
            image += 1
        if filled != tokens:
            raise ValueError(f"sample {sample} has {tokens} image tokens, which is not a whole "
                             f"number of images (token counts per image: {counts})")
        filled = 0
    return torch.tensor(samples, dtype=torch.int64, device=placeholders.device)


def _shortened_sequence(embeds, placeholders, attention_mask, features, kept, padding_side):
    """The real text tokens and the kept visual tokens of each row, in order: embeds, mask."""
    kept_flags = []
    for indices, feature in zip(kept, features):
        flags = torch.zeros(feature.shape[0], dtype=torch.bool, device=feature.device)
        flags[indices] = True
        kept_flags.append(flags)
    keep = torch.zeros_like(placeholders)
    keep[placeholders] = torch.cat(kept_flags)  # row-major order = the images' batch order
    keep = attention_mask.bool() & (~placeholders | keep)
    full = embeds.masked_scatter(placeholders[..., None], torch.cat(features))
    return _compact(full, keep, padding_side)


def _pad_rows(rows, masks):
    """Stack [N_i, D] rows into zero-padded [M, N_max, D] and a candidate mask [M, N_max]
    (None when every row has the same length and no mask: plain LLaVA)."""
    if all(r.shape[0] == rows[0].shape[0] for r in rows) and all(m is None for m in masks):
        return torch.stack(rows), None
    n_max = max(r.shape[0] for r in rows)
    visual = rows[0].new_zeros(len(rows), n_max, rows[0].shape[1])
    mask = torch.zeros(len(rows), n_max, dtype=torch.bool, device=rows[0].device)
    for i, (row, real) in enumerate(zip(rows, masks)):
        visual[i, :row.shape[0]] = row
        mask[i, :row.shape[0]] = True if real is None else real
    return visual, mask


def _compact(full: torch.Tensor, keep_flags: torch.Tensor, padding_side: str):
    """Move each row's kept positions together, padding on ``padding_side``: embeds, mask."""
    lengths = keep_flags.sum(dim=1, keepdim=True)
    width = int(lengths.max())
    slots = keep_flags.long().cumsum(dim=1) - 1
    if padding_side == "left":
        slots = slots + (width - lengths)
    rows = torch.arange(full.shape[0], device=full.device)[:, None].expand_as(slots)
    embeds = full.new_zeros(full.shape[0], width, full.shape[2])
    embeds[rows[keep_flags], slots[keep_flags]] = full[keep_flags]
    mask = torch.zeros(full.shape[0], width, dtype=torch.int64, device=full.device)
    mask[rows[keep_flags], slots[keep_flags]] = 1
    return embeds, mask


__all__ = ["ZSPAPruneLlava", "PrunedInputs", "position_ids_from_mask"]
