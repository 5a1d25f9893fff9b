"""Exact M-RoPE positions for pruned Qwen images inside vLLM (no vLLM import here).

Every kept image token keeps the (temporal, height, width) position it had in the unpruned
prompt, and every text token after an image keeps its original position (the HF wrapper's
``positions="original"``). vLLM computes a request's positions once, when it arrives, but which
tokens an image keeps is known only after its encoder runs; the positions are therefore split:

- ``prompt_columns`` (when the request arrives): the stock positions of the *virtual* unpruned
  prompt, compressed to the pruned one: text keeps its column, each image's ``k`` placeholder
  slots all take the image's first column, its *base* (grid cell (0, 0, 0)).
- ``offset_channels`` (in ``embed_multimodal``): each kept token carries its grid cell
  (t, h, w) relative to that base as extra channels of its embedding row. They travel with the
  row through the encoder cache and chunked prefill.
- ``read_offsets`` (in ``embed_input_ids``): the channels back as int64 offsets, which the
  model's ``forward`` adds to the positions of the same tokens.

Each axis is written as two base-``DIGIT`` digits, every channel an integer in [0, 128): exact
in bfloat16 (whose integers are exact up to 256 only), so offsets up to ``DIGIT ** 2 - 1`` per
axis survive any model dtype.
"""
from typing import List, Sequence, Tuple

import numpy as np
import torch

DIGIT = 128
OFFSET_CHANNELS = 6
"""Extra channels per embedding row: (t, h, w), each as (high digit, low digit)."""
MAX_OFFSET = DIGIT * DIGIT - 1


def grid_offsets(kept: torch.Tensor, grid_w: int) -> torch.Tensor:
    """int64 [3, k]: the (t, h, w) grid cell of each kept token of an image (``kept`` int64
    [k], indices into its row-major merged grid of width ``grid_w``); t is 0."""
    return torch.stack([torch.zeros_like(kept), kept // grid_w, kept % grid_w])


def offset_channels(offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[k, OFFSET_CHANNELS] in ``dtype``: int64 offsets [3, k] as digit channels. ValueError
    past ``MAX_OFFSET`` (an image more than 16383 merged tokens wide or high)."""
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) > MAX_OFFSET):
        raise ValueError(f"M-RoPE offsets must be in [0, {MAX_OFFSET}], got "
                         f"[{int(offsets.min())}, {int(offsets.max())}]")
    digits = torch.stack([offsets // DIGIT, offsets % DIGIT], dim=1)  # [3, 2, k]
    return digits.reshape(OFFSET_CHANNELS, -1).t().to(dtype)


def read_offsets(channels: torch.Tensor) -> torch.Tensor:
    """int64 [3, n] from digit channels [n, OFFSET_CHANNELS] (any float dtype)."""
    digits = channels.round().long().t().reshape(3, 2, -1)
    return digits[:, 0] * DIGIT + digits[:, 1]


def virtual_prompt(tokens: Sequence[int], spans: Sequence[Tuple[int, int, int]],
                   ) -> Tuple[List[int], List[int]]:
    """The unpruned prompt of a pruned one.

    Args:
        tokens: the pruned prompt's token ids.
        spans: per image, in prompt order: (offset of its first placeholder in ``tokens``,
            placeholders there ``k``, its unpruned token count ``n >= k``).
    Returns:
        (the virtual token ids, each image's offset in them). Each image's span is padded with
        ``n - k`` more copies of its first placeholder.
    """
    virtual, offsets, start = [], [], 0
    for offset, kept, full in spans:
        virtual.extend(tokens[start:offset])
        offsets.append(len(virtual))
        virtual.extend(tokens[offset:offset + kept])
        virtual.extend([tokens[offset]] * (full - kept))
        start = offset + kept
    virtual.extend(tokens[start:])
    return virtual, offsets


def prompt_columns(positions: torch.Tensor, spans: Sequence[Tuple[int, int, int]],
                   virtual_offsets: Sequence[int], length: int) -> Tuple[torch.Tensor, int]:
    """The pruned prompt's positions from the virtual prompt's.

    Args:
        positions: int64 [3, L_virtual], the stock positions of the virtual prompt.
        spans: as ``virtual_prompt``; ``virtual_offsets``: its second result.
        length: the pruned prompt's length.
    Returns:
        (int64 [3, length]: text columns as in the virtual prompt, each image's slots at its
        base column; the M-RoPE delta: next position - length, so that generation continues
        where the unpruned prompt's would).
    """
    columns, start, shift = [], 0, 0  # shift: virtual offset - pruned offset
    for (offset, kept, full), voffset in zip(spans, virtual_offsets):
        columns.append(np.arange(start, offset) + shift)
        columns.append(np.full(kept, voffset))
        shift = voffset + full - offset - kept
        start = offset + kept
    columns.append(np.arange(start, length) + shift)
    index = torch.from_numpy(np.concatenate(columns).astype(np.int64))
    delta = int(positions.max()) + 1 - length if positions.numel() else 0
    return positions[:, index], delta


__all__ = ["DIGIT", "MAX_OFFSET", "OFFSET_CHANNELS", "grid_offsets", "offset_channels",
           "prompt_columns", "read_offsets", "virtual_prompt"]
