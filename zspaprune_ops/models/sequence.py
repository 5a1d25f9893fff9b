"""Sequence surgery shared by every family: which sample each visual item belongs to, the
selection over all items in one op call, and the shortened, re-padded sequence with its
positions.

A *visual item* is one image or one video: its placeholder tokens in ``input_ids`` and its
candidate features [N_i, D] (the projector / merger outputs, in the LLM's space). Items fill
the placeholders of their token id in batch order, as the model's own ``masked_scatter`` does.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

PADDING_SIDES = ("left", "right")
POSITIONS = ("original", "compact")


@dataclass
class PrunedInputs:
    """The shortened sequence handed to the language model.

    inputs_embeds: [B, L', D] in the model's embedding dtype; padding slots are zeros.
    attention_mask: int64 [B, L'], 1 = real token.
    position_ids: int64 [B, L'] (LLaVA) or [3, B, L'] (Qwen's M-RoPE: temporal, height,
        width); padding slots hold 0. ``positions="original"``: each token's position in the
        unpruned sequence; ``"compact"``: counted over the shortened sequence.
    kept_indices: int64 [num_images, keep]: per image (batch order), the kept positions within
        its placeholder span (its features), ascending; rows of images keeping fewer end in -1.
    image_features: the candidates per image, [N_i, D] each.
    kept_video_indices / video_features: the same for videos (None without videos).
    rope_deltas: int64 [B, 1] (Qwen only): max position + 1 - real tokens per row, the value
        the model's ``rope_deltas`` takes for this sequence.
    model_kwargs: further inputs the language model needs (Qwen3-VL's DeepStack features).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    kept_indices: torch.Tensor
    image_features: List[torch.Tensor]
    kept_video_indices: Optional[torch.Tensor] = None
    video_features: Optional[List[torch.Tensor]] = None
    rope_deltas: Optional[torch.Tensor] = None
    model_kwargs: Dict[str, object] = field(default_factory=dict)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1``, 0 at padding: the positions HF's ``generate`` derives."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


def check_text(input_ids, attention_mask, prompt_mask, padding_side):
    """Check the text inputs; returns (attention_mask, prompt_mask, padding_side) with defaults
    (all real; every token may form the prompt; right if right-padded, else left)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64,
                                                                          torch.int32):
        raise TypeError(f"input_ids must be an integer tensor, got {describe(input_ids)}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {describe(input_ids)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if prompt_mask is None:
        prompt_mask = torch.ones_like(input_ids, dtype=torch.bool)
    for name, mask in (("attention_mask", attention_mask), ("prompt_mask", prompt_mask)):
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            raise ValueError(f"{name} must be a tensor of shape {list(input_ids.shape)} "
                             f"like input_ids, got {describe(mask)}")
    if prompt_mask.dtype != torch.bool:
        raise TypeError(f"prompt_mask must be a bool tensor, got {prompt_mask.dtype}")
    if padding_side is None:
        right = bool((attention_mask[:, -1] == 0).any()) and bool(attention_mask[:, 0].all())
        padding_side = "right" if right else "left"
    elif padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    return attention_mask, prompt_mask, padding_side


def reject_unpruned_kwargs(kwargs, owner: str) -> None:
    for name in ("inputs_embeds", "position_ids", "labels", "past_key_values", "cache"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} refers to the unpruned sequence and is not supported by "
                             f"{owner}; call prune_inputs() and the model directly")


def item_samples(placeholders: torch.Tensor, features: Sequence[torch.Tensor],
                 name: str = "image") -> List[int]:
    """The sample of each item (items fill the placeholders of ``placeholders`` [B, L] in
    order); ValueError if the counts disagree."""
    per_sample = placeholders.sum(dim=1).tolist()
    counts = [f.shape[0] for f in features]
    if sum(per_sample) != sum(counts):
        raise ValueError(f"input_ids hold {sum(per_sample)} {name} tokens but the {name}s give "
                         f"{sum(counts)} features ({counts}); process text and {name}s together")
    samples, item = [], 0
    for sample, tokens in enumerate(per_sample):
        filled = 0
        while filled < tokens:
            filled += counts[item]
            samples.append(sample)
            item += 1
        if filled != tokens:
            raise ValueError(f"sample {sample} has {tokens} {name} tokens, which is not a whole "
                             f"number of {name}s (token counts per {name}: {counts})")
    return samples


def pad_rows(rows, masks):
    """Stack [N_i, D] rows into zero-padded [M, N_max, D] and a candidate mask [M, N_max]
    (None when every row has the same length and no mask)."""
    if all(r.shape[0] == rows[0].shape[0] for r in rows) and all(m is None for m in masks):
        return torch.stack(rows), None
    n_max = max(r.shape[0] for r in rows)
    visual = rows[0].new_zeros(len(rows), n_max, rows[0].shape[1])
    mask = torch.zeros(len(rows), n_max, dtype=torch.bool, device=rows[0].device)
    for i, (row, real) in enumerate(zip(rows, masks)):
        visual[i, :row.shape[0]] = row
        mask[i, :row.shape[0]] = True if real is None else real
    return visual, mask


@dataclass
class Choice:
    """Kept positions per item (int64, ascending) and a 0-dim bool tensor: True if the op
    returned a negative index for an item it pruned (checked at the next host sync)."""

    kept: List[torch.Tensor]
    invalid: torch.Tensor


def choose(features, candidate_masks, keep: int, embeds, prompt_mask, samples,
           select: Callable) -> Choice:
    """Items with at most ``keep`` tokens stay whole; an item whose candidates (its
    ``candidate_masks`` entry, None = all) number at most ``keep`` keeps them all; the others
    go to one ``select(visual, prompt, prompt_mask, visual_mask)`` call together."""
    kept: List[Optional[torch.Tensor]] = []
    to_prune = []
    for item, (feature, candidates) in enumerate(zip(features, candidate_masks)):
        n = feature.shape[0]
        if n <= keep:
            kept.append(torch.arange(n, device=feature.device))
        elif candidates is not None and int(candidates.sum()) <= keep:
            kept.append(candidates.nonzero().squeeze(1))
        else:
            kept.append(None)
            to_prune.append(item)
    invalid = torch.zeros((), dtype=torch.bool, device=embeds.device)
    if to_prune:
        visual, visual_mask = pad_rows([features[i] for i in to_prune],
                                       [candidate_masks[i] for i in to_prune])
        rows = torch.tensor([samples[i] for i in to_prune], device=embeds.device)
        picks = select(visual, embeds[rows], prompt_mask[rows], visual_mask)
        invalid = (picks < 0).any()
        for item, row in zip(to_prune, picks):
            kept[item] = row
    return Choice(kept, invalid)


def kept_placeholders(placeholders: torch.Tensor, features, kept) -> torch.Tensor:
    """bool [B, L]: the placeholders whose item keeps that token."""
    flags = []
    for indices, feature in zip(kept, features):
        row = torch.zeros(feature.shape[0], dtype=torch.bool, device=feature.device)
        row[indices] = True
        flags.append(row)
    result = torch.zeros_like(placeholders)
    if flags:
        result[placeholders] = torch.cat(flags)  # row-major order = the items' batch order
    return result


def kept_index_rows(kept, keep: int, device) -> torch.Tensor:
    """int64 [num_items, keep]: each item's kept indices, -1 after its last."""
    rows = torch.full((len(kept), keep), -1, dtype=torch.int64, device=device)
    for row, indices in enumerate(kept):
        rows[row, :indices.numel()] = indices
    return rows


class Compaction:
    """Moves each row's kept positions together, padding on ``padding_side``.

    One host sync reads the new width and the ``invalid`` flag of ``choose``: a negative index
    from the op raises RuntimeError here instead of becoming a position.
    """

    def __init__(self, keep: torch.Tensor, padding_side: str, invalid: torch.Tensor):
        lengths = keep.sum(dim=1, keepdim=True)
        width, bad = torch.stack([lengths.max(), invalid.long()]).tolist()
        if bad:
            raise RuntimeError("the selection returned a negative index for an image or video "
                               "it pruned (a failed GPU selection); nothing was run on it")
        slots = keep.long().cumsum(dim=1) - 1
        if padding_side == "left":
            slots = slots + (width - lengths)
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(slots)
        self.keep, self.width = keep, width
        self.rows, self.slots = rows[keep], slots[keep]

    def __call__(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """[B, L, *] -> [B, L', *]: the kept entries of every row, ``fill`` at padding."""
        out = x.new_full((x.shape[0], self.width, *x.shape[2:]), fill)
        out[self.rows, self.slots] = x[self.keep]
        return out

    def mask(self) -> torch.Tensor:
        """int64 [B, L']: 1 at the kept entries."""
        return self(torch.ones_like(self.keep, dtype=torch.int64))

    def positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] or [3, B, L] position ids -> the same for the shortened sequence."""
        if position_ids.dim() == 2:
            return self(position_ids)
        return self(position_ids.permute(1, 2, 0)).permute(2, 0, 1)


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return positions
