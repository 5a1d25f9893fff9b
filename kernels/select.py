"""The fused selection's host side: sizing, scratch buffers and the two launches.

Launch 1 (``prepare._prepare_kernel``, fully parallel over B x row tiles x jobs) computes
per-token partial sums (squared norms, dots with the prompt sum) over feature splits and, where
needed, Gram tiles (stored for moderate N) or each token's nearest-other cosine (DivPrune's first
pick). Launch 2 (``fill``) runs core top-k and the farthest-point fill per image: over Gram rows
with all keys in registers (``_select_gram_kernel``) or, without the N x N scratch, computing
the chosen token's cosines from the features (``_select_stream_kernel``, keys in an O(B·N)
scratch, each image spread over co-resident programs that meet in a grid-wide argmax).
No host-device sync, no Python loop over keep: CUDA-graph capturable. See kernels/README.md.
"""
import contextlib

import torch
import triton

from zspaprune_ops.rule import core_size, may_start_with_divprune

from .fill import _select_gram_kernel, _select_stream_kernel
from .prepare import _prepare_kernel

TILE = 64
"""Rows and columns of a launch-1 tile (a 64x64 float32 accumulator)."""
PREPARE_WARPS = 8
"""Warps of launch 1: with 4, the 64x64 tiles spill (see ``python -m zspaprune_ops.kernels.aot``)."""


def tile_k(dtype: torch.dtype) -> int:
    """Feature chunk of launch 1: float32 products are not on tensor cores, so a smaller chunk
    keeps their tiles in registers."""
    return 32 if dtype == torch.float32 else 64


SPLIT_FEATURES, MAX_SPLITS = 512, 16
"""Launch 1 splits the row statistics over the features (partial sums, added by launch 2), so
no program walks all D features times all T prompt tokens alone."""
PROMPT_ROWS = 32
"""Prompt tokens summed per chunk by the row-statistics job."""
GRAM_MAX_N = 4096
"""Largest N that uses the Gram scratch (its launch 2 keeps the keys in registers)."""
GRAM_MAX_BYTES = 1 << 30
"""Bound on the [B, N, N] float32 Gram scratch; larger batches stream the features."""
NEAREST_GROUP_COLS = 2048
"""Streaming mode: columns one launch-1 program scans for the DivPrune nearest neighbour."""
REGISTER_BLOCKS = ((256, 1), (1024, 2), (4096, 8))
"""(block, num_warps) buckets of the Gram-mode launch 2: the block holds all N keys. Few warps:
each step's argmax is then mostly warp shuffles (latency-bound loop); 4096 needs 8 to not spill."""
STREAM_BLOCK_N, STREAM_BLOCK_D, STREAM_WARPS = 32, 256, 4
"""Streaming-mode launch 2 tile: tokens x features per on-the-fly dot product chunk."""
MAX_PARTS = 256
"""Most programs per image in the cooperative streaming launch 2 (a power of two)."""
COOPERATIVE = True
"""Spread each image of the streaming launch 2 over several co-resident programs on CUDA.
Unverified on a GPU so far; False gives one program per image (what the interpreter runs)."""


def uses_gram(batch: int, n: int) -> bool:
    """Whether launch 2 walks a float32 [B, N, N] Gram scratch (moderate N, bounded bytes)."""
    return n <= GRAM_MAX_N and batch * n * n * 4 <= GRAM_MAX_BYTES


def stream_parts(batch: int, n: int, device: torch.device) -> int:
    """Programs per image of the streaming launch 2: all B * parts programs must be resident at
    once for the grid-wide argmax, so at most one per SM (host-side query, no sync); 1 off CUDA
    (Triton's interpreter runs programs one after another) or with ``COOPERATIVE`` off."""
    if not COOPERATIVE or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_PARTS, sms // batch, triton.cdiv(n, STREAM_BLOCK_N)))


def register_block(n: int):
    """(BLOCK, num_warps) of the Gram-mode launch 2 for N tokens."""
    return next((block, warps) for block, warps in REGISTER_BLOCKS if n <= block)


def select_batched(visual, prompt, keep, relevance_ratio, prompt_mask=None, visual_mask=None,
                   *, gram=None, parts=None):
    """The selection on checked batched inputs, in two kernel launches; same contract as
    ``zspaprune_ops.reference.naive.select_batched``.

    visual [B, N, D] and prompt [B, T, D] (float16/bfloat16/float32; a feature stride other
    than 1 costs a contiguous copy), masks bool [B, T] / [B, N] or None. Returns int64
    [B, keep], ascending rows. ``gram`` forces (True) or forbids (False) the [B, N, N] scratch
    (default: ``uses_gram``); ``parts``: programs per image of the streaming launch 2 (default:
    ``stream_parts``). Extra memory, float32: [B, N] x (3 + 2 * feature splits) for keys and
    partial sums, the Gram scratch if used, and [B, ceil(N / 2048), N] nearest-neighbour maxima
    ([B, ceil(N / 64), N] in Gram mode) when a row can start with DivPrune's pick.
    """
    visual, prompt = _rows_contiguous(visual), _rows_contiguous(prompt)
    B, N, D = visual.shape
    T = prompt.shape[1]
    gram = uses_gram(B, N) if gram is None else gram
    nearest_needed = may_start_with_divprune(T, keep, relevance_ratio, prompt_mask is not None)
    n_splits, split_len = feature_splits(D, tile_k(visual.dtype))
    n_tiles = triton.cdiv(N, TILE)
    tiles_per_group = 1 if gram else NEAREST_GROUP_COLS // TILE
    n_groups = triton.cdiv(n_tiles, tiles_per_group) if gram or nearest_needed else 0

    device = visual.device
    f32 = dict(device=device, dtype=torch.float32)
    inv, rel, fill = torch.empty(3, B, N, **f32).unbind(0)
    part = torch.empty(B, 2, n_splits, N, **f32)
    psq = torch.empty(B, n_splits, **f32)
    counts = torch.empty(3, B, device=device, dtype=torch.int32)
    picks = torch.empty(B, keep, device=device, dtype=torch.int64)
    gram_scratch = torch.empty(B, N, N, **f32) if gram else inv
    nearest = torch.empty(B, n_groups, N, **f32) if nearest_needed else inv
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _prepare_kernel[(n_tiles, n_splits + n_groups, B)](
            visual, prompt, _or(prompt_mask, inv), _or(visual_mask, inv), part, psq, fill,
            counts, gram_scratch, nearest, B, N, D, T, core_size(keep, relevance_ratio),
            n_splits, split_len, tiles_per_group, n_groups, *visual.stride()[:2],
            *prompt.stride()[:2], *_strides(prompt_mask), *_strides(visual_mask),
            HAS_PMASK=prompt_mask is not None, HAS_VMASK=visual_mask is not None,
            STORE_GRAM=gram, NEED_NEAREST=nearest_needed,
            DOT_FP32=visual.dtype == torch.bfloat16 and _interpreted(), BM=TILE,
            BK=tile_k(visual.dtype), BT=PROMPT_ROWS, num_warps=PREPARE_WARPS)
        if gram:
            block, warps = register_block(N)
            _select_gram_kernel[(B,)](gram_scratch, part, psq, counts, inv, fill, nearest, picks,
                                      B, N, keep, n_splits, n_groups,
                                      NEED_NEAREST=nearest_needed, BLOCK=block, num_warps=warps)
        else:
            parts = stream_parts(B, N, device) if parts is None else parts
            slice_len = triton.cdiv(triton.cdiv(N, parts), STREAM_BLOCK_N) * STREAM_BLOCK_N
            cand_val = torch.empty(B, 2, MAX_PARTS, **f32)
            cand_idx = torch.empty(B, 2, MAX_PARTS, device=device, dtype=torch.int32)
            _select_stream_kernel[(parts, B)](
                visual, part, psq, counts, inv, rel, fill, nearest, cand_val, cand_idx, picks,
                B, N, D, keep, n_splits, n_groups, parts, slice_len, *visual.stride()[:2],
                NEED_NEAREST=nearest_needed, BLOCK_N=STREAM_BLOCK_N, BLOCK_D=STREAM_BLOCK_D,
                PMAX=MAX_PARTS, num_warps=STREAM_WARPS)
    return picks


def feature_splits(d: int, chunk: int):
    """(splits, features per split) of launch 1's row statistics: about SPLIT_FEATURES each,
    a multiple of ``chunk``, at most MAX_SPLITS splits."""
    splits = min(MAX_SPLITS, triton.cdiv(d, SPLIT_FEATURES))
    length = triton.cdiv(triton.cdiv(d, splits), chunk) * chunk
    return triton.cdiv(d, length), length


def _or(mask, dummy):
    return mask if mask is not None else dummy


def _interpreted() -> bool:
    # Triton's interpreter multiplies bfloat16 dot operands as raw uint16 bits (3.9.0): there the
    # tiles are upcast first. Bfloat16 products are exact in float32, so only the summation order
    # differs from the tensor-core path.
    return type(_prepare_kernel).__name__ == "InterpretedFunction"


def _rows_contiguous(x):
    """The kernels index features with unit stride: copy only inputs laid out otherwise."""
    return x if x.shape[-1] == 1 or x.stride(-1) == 1 else x.contiguous()


def _strides(mask):
    return mask.stride() if mask is not None else (0, 0)
