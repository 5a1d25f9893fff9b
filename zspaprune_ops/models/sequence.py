"""Sequence surgery shared by every family: where each visual item sits, its prompt, and the
shortened, re-padded sequence with its positions (the choice itself: ``zspaprune_ops.choice``).

A *visual item* is one image or one video: its placeholder tokens in ``input_ids`` and its
candidate features [N_i, D] (the projector / merger outputs, in the LLM's space). Items fill
the placeholders of their token id in batch order, as the model's own ``masked_scatter`` does.
"""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from zspaprune_ops.prompt import ChatLayout, prompt_positions

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
    kept_indices: int64 [num_images, K]: per image (batch order), the kept positions within
        its placeholder span (its features), ascending; rows of images keeping fewer end in -1
        (K: ``keep``, or the largest image's budget when ``keep`` is a share).
    image_features: the candidates per image, [N_i, D] each.
    kept_video_indices / video_features: the same for videos (None without videos).
    rope_deltas: int64 [B, 1] (Qwen only): max position + 1 - real tokens per row, the value
        the model's ``rope_deltas`` takes for this sequence.
    model_kwargs: further inputs the language model needs (Qwen3-VL's DeepStack features).
    forward_kwargs: further inputs of the wrapped model's forward / generate for the shortened
        sequence (Gemma 3's token_type_ids).
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
    forward_kwargs: Dict[str, object] = field(default_factory=dict)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1``, 0 at padding: the positions HF's ``generate`` derives."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def describe_value(x) -> str:
    """A short description of an argument for error messages: dtype and shape, or type."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


def check_text(input_ids, attention_mask, prompt_mask, padding_side):
    """Check the text inputs; returns (attention_mask, prompt_mask, padding_side) with defaults
    (all real; None: the prompt setting decides; right if right-padded, else left)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64,
                                                                          torch.int32):
        raise TypeError(f"input_ids must be an integer tensor, got {describe_value(input_ids)}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {describe_value(input_ids)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, mask in (("attention_mask", attention_mask), ("prompt_mask", prompt_mask)):
        if mask is None and name == "prompt_mask":
            continue
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            raise ValueError(f"{name} must be a tensor of shape {list(input_ids.shape)} "
                             f"like input_ids, got {describe_value(mask)}")
    if prompt_mask is not None and prompt_mask.dtype != torch.bool:
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


def item_starts(placeholders: torch.Tensor, features: Sequence[torch.Tensor],
                name: str = "image") -> List[Tuple[int, int]]:
    """(sample, position of its first placeholder) of each item; items fill the placeholders of
    ``placeholders`` [B, L] in order, ``features[i]`` [N_i, D] giving each item's count.
    ValueError if the counts disagree."""
    per_sample = placeholders.sum(dim=1).tolist()
    counts = [f.shape[0] for f in features]
    if sum(per_sample) != sum(counts):
        raise ValueError(f"input_ids hold {sum(per_sample)} {name} tokens but the {name}s give "
                         f"{sum(counts)} features ({counts}); process text and {name}s together")
    starts, item = [], 0
    for sample, tokens in enumerate(per_sample):
        positions = placeholders[sample].nonzero().squeeze(1).tolist()
        filled = 0
        while filled < tokens:
            starts.append((sample, positions[filled]))
            filled += counts[item]
            item += 1
        if filled != tokens:
            raise ValueError(f"sample {sample} has {tokens} {name} tokens, which is not a whole "
                             f"number of {name}s (token counts per {name}: {counts})")
    return starts


def item_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_mask: Optional[torch.Tensor], embeds: torch.Tensor,
                 placeholders: torch.Tensor, starts: Sequence[Tuple[int, int]],
                 layout: Optional[ChatLayout], prompt: str,
                 inserted: Optional["re.Pattern"] = None) -> List[torch.Tensor]:
    """Each item's prompt embeddings [T_i, D] (rows of ``embeds`` [B, L, D]).

    An explicit ``prompt_mask`` [B, L] gives every item of a sample the sample's masked real
    non-placeholder tokens (one tensor per sample, gathered once); otherwise ``zspaprune_ops.prompt.prompt_positions`` decides, one
    parse per sample (``placeholders`` bool [B, L]: the image/video placeholders; ``inserted``:
    the processor's own text in user messages, never prompt)."""
    real = attention_mask.bool()
    if prompt_mask is not None:  # one gather (and host sync) per sample, shared by its items
        rows = prompt_mask & real & ~placeholders
        gathered: Dict[int, torch.Tensor] = {}
        for sample, _ in starts:
            if sample not in gathered:
                gathered[sample] = embeds[sample, rows[sample]]
        return [gathered[sample] for sample, _ in starts]
    by_sample: Dict[int, List[int]] = {}
    for item, (sample, _) in enumerate(starts):
        by_sample.setdefault(sample, []).append(item)
    placeholder_ids = input_ids[placeholders].unique().tolist()
    out: List[Optional[torch.Tensor]] = [None] * len(starts)
    for sample, items in by_sample.items():
        where = real[sample].nonzero().squeeze(1)  # real positions: the sequence without padding
        local = {int(p): k for k, p in enumerate(where.tolist())}
        chosen = prompt_positions(input_ids[sample, where].tolist(),
                                  [local[starts[i][1]] for i in items], placeholder_ids,
                                  layout, prompt, inserted)
        for item, positions in zip(items, chosen):
            index = torch.tensor(positions, dtype=torch.long, device=where.device)
            out[item] = embeds[sample, where[index]]
    return out


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


def kept_index_rows(kept, width: int, device) -> torch.Tensor:
    """int64 [num_items, width]: each item's kept indices, -1 after its last."""
    rows = torch.full((len(kept), width), -1, dtype=torch.int64, device=device)
    for row, indices in enumerate(kept):
        rows[row, :indices.numel()] = indices
    return rows


def placeholder_runs(placeholders: torch.Tensor) -> List[Tuple[int, int, int]]:
    """(sample, first position, length) of every maximal run of consecutive True in bool
    [B, L], in batch order (row-major): the spans of families whose processor writes each
    image (or each tile group) as one contiguous run between marker tokens."""
    before = torch.nn.functional.pad(placeholders, (1, 0))[:, :-1]
    after = torch.nn.functional.pad(placeholders, (0, 1))[:, 1:]
    firsts = (placeholders & ~before).nonzero().tolist()
    lasts = (placeholders & ~after).nonzero().tolist()
    return [(b, p, q - p + 1) for (b, p), (_, q) in zip(firsts, lasts)]


def merged_sequence(embeds: torch.Tensor, attention_mask: torch.Tensor, media
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unpruned sequence's embeddings and which of its tokens the shortened one keeps.

    Args:
        embeds: [B, L, D] token embeddings; attention_mask: [B, L], 1 = real token.
        media: per kind of item (images, videos), ``(placeholders, features, kept)``:
            placeholders bool [B, L], features [N_i, D] per item (filling the placeholders in
            batch order), kept indices per item.
    Returns:
        ([B, L, D]: ``embeds`` with each item's features at its placeholders,
        bool [B, L]: the real text tokens and the kept placeholders).
    """
    keep, full = attention_mask.bool(), embeds
    for placeholders, features, kept in media:
        if not len(features):
            continue
        keep = keep & (~placeholders | kept_placeholders(placeholders, features, kept))
        full = full.masked_scatter(placeholders[..., None], torch.cat(features))
    return full, keep


def line_positions(positions: str, attention_mask: torch.Tensor,
                   compact: "Compaction") -> torch.Tensor:
    """int64 [B, L'] positions of the shortened sequence for a language model with one position
    axis: ``"original"``: each kept token's position in the unpruned sequence; ``"compact"``:
    counted over the shortened sequence (what ``generate`` derives from its mask)."""
    if check_positions(positions) == "original":
        return compact.positions(position_ids_from_mask(attention_mask))
    return position_ids_from_mask(compact.mask())


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
