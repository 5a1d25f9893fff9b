"""The M-RoPE arithmetic of the vLLM plugin's Qwen models (zspaprune_ops.vllm.positions; runs
without vLLM): a pruned prompt's positions plus each kept token's offsets are exactly the
unpruned prompt's positions of the same tokens."""
import numpy as np
import pytest
import torch

from zspaprune_ops.vllm.positions import (MAX_OFFSET, OFFSET_CHANNELS, grid_offsets,
                                          offset_channels, prompt_columns, read_offsets,
                                          virtual_prompt)

IMAGE = 99


def stock_positions(tokens, images):
    """Qwen's M-RoPE positions of an unpruned prompt (what vLLM's get_mrope_input_positions
    computes): ``images`` maps each image's first placeholder offset to its merged (h, w)."""
    columns, nxt, i = [], 0, 0
    while i < len(tokens):
        if i in images:
            h, w = images[i]
            grid = np.indices((1, h, w)).reshape(3, -1) + nxt
            columns.append(grid)
            nxt = int(grid.max()) + 1
            i += h * w
        else:
            columns.append(np.full((3, 1), nxt))
            nxt += 1
            i += 1
    return torch.from_numpy(np.concatenate(columns, axis=1).astype(np.int64))


@pytest.mark.parametrize("seed", range(6))
def test_pruned_positions_plus_offsets_are_the_unpruned_positions(seed):
    rng = np.random.default_rng(seed)
    grids = [(int(rng.integers(1, 6)), int(rng.integers(1, 7))) for _ in range(3)]
    tokens, spans, kept_sets, images, virtual_tokens = [], [], [], {}, []
    for h, w in grids:
        text = list(rng.integers(0, 50, int(rng.integers(0, 4))))
        tokens += text
        virtual_tokens += text
        full = h * w
        kept = np.sort(rng.choice(full, int(rng.integers(1, full + 1)), replace=False))
        images[len(virtual_tokens)] = (h, w)
        spans.append((len(tokens), len(kept), full))
        kept_sets.append(torch.from_numpy(kept))
        tokens += [IMAGE] * len(kept)
        virtual_tokens += [IMAGE] * full
    tail = list(rng.integers(0, 50, 3))
    tokens += tail
    virtual_tokens += tail

    virtual, offsets = virtual_prompt(tokens, spans)
    assert virtual == virtual_tokens
    assert offsets == sorted(images)
    stock = stock_positions(virtual, images)
    pruned, delta = prompt_columns(stock, spans, offsets, len(tokens))

    expected, added = [], []
    for i, (offset, kept, full) in enumerate(spans):
        start = spans[i - 1][0] + spans[i - 1][1] if i else 0
        vstart = offsets[i - 1] + spans[i - 1][2] if i else 0
        expected.append(stock[:, vstart:vstart + offset - start])
        added.append(torch.zeros(3, offset - start, dtype=torch.int64))
        expected.append(stock[:, offsets[i] + kept_sets[i]])
        channels = offset_channels(grid_offsets(kept_sets[i], grids[i][1]), torch.bfloat16)
        assert channels.shape == (kept, OFFSET_CHANNELS)
        added.append(read_offsets(channels))
    expected.append(stock[:, -len(tail):])
    added.append(torch.zeros(3, len(tail), dtype=torch.int64))
    assert torch.equal(pruned + torch.cat(added, dim=1), torch.cat(expected, dim=1))
    assert len(tokens) + delta == int(stock.max()) + 1  # generation goes on as unpruned


def test_all_kept_changes_nothing():
    tokens = [1, 2] + [IMAGE] * 6 + [3]
    stock = stock_positions(tokens, {2: (2, 3)})
    spans = [(2, 6, 6)]
    virtual, offsets = virtual_prompt(tokens, spans)
    pruned, delta = prompt_columns(stock, spans, offsets, len(tokens))
    base = pruned + torch.cat([torch.zeros(3, 2, dtype=torch.int64),
                               grid_offsets(torch.arange(6), 3),
                               torch.zeros(3, 1, dtype=torch.int64)], dim=1)
    assert virtual == tokens and torch.equal(base, stock)
    assert delta == int(stock.max()) + 1 - len(tokens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_offset_channels_are_exact_in_every_model_dtype(dtype):
    offsets = torch.tensor([[0, 1, 255, 256, 4097, MAX_OFFSET]] * 3)
    assert torch.equal(read_offsets(offset_channels(offsets, dtype)), offsets)


def test_offsets_past_the_digits_are_refused():
    with pytest.raises(ValueError, match="offsets must be in"):
        offset_channels(torch.tensor([[0], [MAX_OFFSET + 1], [0]]), torch.float32)
