"""Fused Triton kernels of ZSPAPrune's selection: two launches per call, for the whole batch.

Launch 1, ``_prepare_kernel``, grid (row tiles, 1 + column groups, B), fully parallel:
  * job 0 of each row tile: float32 inverse norms, the scorable flag, the relevance key
    (cosine to the mean real prompt token, with the rule's sentinels), the initial fill key
    and, in tile 0, the row's core size (0 when the row has no real prompt token);
  * the other jobs: raw Gram tiles ``V V^T`` on tensor cores (float32 accumulation; float32
    inputs use exact ``ieee`` products, never tf32) stored to an [B, N, N] scratch when
    ``STORE_GRAM``, and/or each token's largest cosine to another real token, per column
    group, when the DivPrune first pick is needed (``NEED_NEAREST``).
Launch 2, one program per image: core top-k by repeated argmax of the relevance key, then the
farthest-point fill; each step reads one Gram row (``_select_gram_kernel``, keys in registers)
or computes the chosen token's cosines on the fly from the features
(``_select_stream_kernel``, keys in an O(B·N) scratch). The chosen tokens end with fill key
-inf; a prefix sum writes their indices in ascending order, so no sort is launched.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

from zspaprune_ops.rule import DEMOTED, NORM_EPS, PADDING, core_size

_DEMOTED = tl.constexpr(DEMOTED)
_PADDING = tl.constexpr(PADDING)
_EPS = tl.constexpr(NORM_EPS)

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
REGISTER_BLOCKS = ((256, 4), (1024, 4), (4096, 8))
"""(block, num_warps) buckets of the Gram-mode launch 2: the block holds all N keys."""
STREAM_BLOCK_N, STREAM_BLOCK_D, STREAM_WARPS = 64, 64, 4
"""Streaming-mode launch 2 tile: tokens x features per on-the-fly dot product chunk."""
MAX_PARTS = 256
"""Most programs per image in the cooperative streaming launch 2 (a power of two)."""
COOPERATIVE = True
"""Spread each image of the streaming launch 2 over several co-resident programs on CUDA.
Unverified on a GPU so far; False gives one program per image (what the interpreter runs)."""
_MAX_SPINS = tl.constexpr(1 << 26)


@triton.jit
def _row_stats(visual_ptr, prompt_ptr, pmask_ptr, vmask_ptr, part_ptr, psq_ptr, fill_ptr,
               counts_ptr, b, B, tile_m, split, n_splits, split_len, N, D, T, n_core,
               s_vb, s_vn, s_pb, s_pt, s_pmb, s_pmt, s_vmb, s_vmn,
               HAS_PMASK: tl.constexpr, HAS_VMASK: tl.constexpr,
               BM: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    """Partial sums over one feature split: squared norms and dot products with the sum of
    the real prompt tokens per row, the prompt sum's squared norm; split 0 also seeds the fill
    key (0 real, PADDING padded) and, in row tile 0, the row's counters."""
    rows = tile_m * BM + tl.arange(0, BM)
    in_rows = rows < N
    row_ptr = visual_ptr + b * s_vb + rows[:, None] * s_vn
    squares = tl.zeros([BM], tl.float32)
    dots = tl.zeros([BM], tl.float32)
    prompt_squares = tl.zeros([BK], tl.float32)
    first = split * split_len
    for k0 in range(first, tl.minimum(first + split_len, D), BK):
        ks = k0 + tl.arange(0, BK)
        in_k = ks < D
        v = tl.load(row_ptr + ks[None, :], mask=in_rows[:, None] & in_k[None, :],
                    other=0.0).to(tl.float32)
        squares += tl.sum(v * v, axis=1)
        prompt_sum = tl.zeros([BK], tl.float32)
        for t0 in range(0, T, BT):
            real_t = _prompt_real(pmask_ptr, b, t0, T, s_pmb, s_pmt, HAS_PMASK, BT)
            ts = t0 + tl.arange(0, BT)
            p = tl.load(prompt_ptr + b * s_pb + ts[:, None] * s_pt + ks[None, :],
                        mask=real_t[:, None] & in_k[None, :], other=0.0).to(tl.float32)
            prompt_sum += tl.sum(p, axis=0)
        dots += tl.sum(v * prompt_sum[None, :], axis=1)
        prompt_squares += prompt_sum * prompt_sum
    tl.store(part_ptr + ((b * 2) * n_splits + split) * N + rows, squares, mask=in_rows)
    tl.store(part_ptr + ((b * 2 + 1) * n_splits + split) * N + rows, dots, mask=in_rows)
    if tile_m == 0:
        tl.store(psq_ptr + b * n_splits + split, tl.sum(prompt_squares, axis=0))
    if split == 0:
        real = in_rows
        if HAS_VMASK:
            real &= tl.load(vmask_ptr + b * s_vmb + rows * s_vmn, mask=in_rows, other=0) != 0
        tl.store(fill_ptr + b * N + rows, tl.where(real, 0.0, _PADDING), mask=in_rows)
        if tile_m == 0:
            count = tl.full([], 0, tl.int32)
            for t0 in range(0, T, BT):
                count += tl.sum(
                    _prompt_real(pmask_ptr, b, t0, T, s_pmb, s_pmt, HAS_PMASK, BT).to(tl.int32))
            tl.store(counts_ptr + b, tl.where(count > 0, n_core, 0))  # the row's core size
            tl.store(counts_ptr + B + b, 0)  # launch 2's barrier counter, zeroed every call
            tl.store(counts_ptr + 2 * B + b, count)  # real prompt tokens


@triton.jit
def _token_keys(part_ptr, psq_ptr, counts_ptr, fill_ptr, b, B, offs, inside, N, n_splits):
    """Launch 1's partial sums -> per token: inverse norm, relevance key and fill key (the
    rule's sentinels; -inf outside [0, N))."""
    squares = tl.zeros(offs.shape, tl.float32)
    dots = tl.zeros(offs.shape, tl.float32)
    prompt_squares = tl.zeros([], tl.float32)
    for j in range(0, n_splits):
        squares += tl.load(part_ptr + ((b * 2) * n_splits + j) * N + offs, mask=inside, other=0.0)
        dots += tl.load(part_ptr + ((b * 2 + 1) * n_splits + j) * N + offs, mask=inside,
                        other=0.0)
        prompt_squares += tl.load(psq_ptr + b * n_splits + j)
    real = inside & (tl.load(fill_ptr + b * N + offs, mask=inside, other=_PADDING) == 0.0)
    norm = tl.sqrt(squares)
    inv = 1.0 / tl.where(norm < _EPS, _EPS, norm)  # a NaN norm stays NaN
    scorable = norm < float("inf")  # False for NaN and Inf norms
    # relevance = v_hat . p_hat with p_hat = mean / max(|mean|, eps), mean = sum / count
    count = tl.maximum(tl.load(counts_ptr + 2 * B + b), 1).to(tl.float32)
    mean_norm = tl.sqrt(prompt_squares) / count
    relevance = dots * inv / (count * tl.where(mean_norm < _EPS, _EPS, mean_norm))
    # keep overflowed scores off the sentinels (only features beyond ~1e19 get here)
    relevance = tl.minimum(tl.maximum(relevance, -1.5), 1.5)
    relevance = tl.where(scorable & (relevance == relevance), relevance, _DEMOTED)
    relevance = tl.where(real, relevance, _PADDING)
    fill = tl.where(real, tl.where(scorable, float("inf"), _DEMOTED), _PADDING)
    return (inv, tl.where(inside, relevance, float("-inf")),
            tl.where(inside, fill, float("-inf")))


@triton.jit
def _prompt_real(pmask_ptr, b, t0, T, s_pmb, s_pmt, HAS_PMASK: tl.constexpr, BT: tl.constexpr):
    ts = t0 + tl.arange(0, BT)
    real = ts < T
    if HAS_PMASK:
        real &= tl.load(pmask_ptr + b * s_pmb + ts * s_pmt, mask=real, other=0) != 0
    return real


@triton.jit
def _gram_group(visual_ptr, vmask_ptr, gram_ptr, nearest_ptr, b, tile_m, group, N, D,
                tiles_per_group, n_groups, s_vb, s_vn, s_vmb, s_vmn,
                HAS_VMASK: tl.constexpr, STORE_GRAM: tl.constexpr, NEED_NEAREST: tl.constexpr,
                DOT_FP32: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tile_m * BM + tl.arange(0, BM)
    in_rows = rows < N
    nearest = tl.full([BM], float("-inf"), tl.float32)  # largest cosine to another real token
    first = group * tiles_per_group
    stop = tl.minimum(first + tiles_per_group, tl.cdiv(N, BM))
    for tile_n in range(first, stop):
        cols = tile_n * BM + tl.arange(0, BM)
        in_cols = cols < N
        gram = tl.zeros([BM, BM], tl.float32)
        row_squares = tl.zeros([BM], tl.float32)
        col_squares = tl.zeros([BM], tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            in_k = ks < D
            a = tl.load(visual_ptr + b * s_vb + rows[:, None] * s_vn + ks[None, :],
                        mask=in_rows[:, None] & in_k[None, :], other=0.0)
            c = tl.load(visual_ptr + b * s_vb + cols[:, None] * s_vn + ks[None, :],
                        mask=in_cols[:, None] & in_k[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                c = c.to(tl.float32)
            gram = tl.dot(a, tl.trans(c), gram, input_precision="ieee")
            if NEED_NEAREST:
                a32 = a.to(tl.float32)
                c32 = c.to(tl.float32)
                row_squares += tl.sum(a32 * a32, axis=1)
                col_squares += tl.sum(c32 * c32, axis=1)
        if STORE_GRAM:
            tl.store(gram_ptr + (b * N + rows[:, None]) * N + cols[None, :], gram,
                     mask=in_rows[:, None] & in_cols[None, :])
        if NEED_NEAREST:
            row_norm = tl.sqrt(row_squares)
            col_norm = tl.sqrt(col_squares)
            cosine = (gram / tl.where(row_norm < _EPS, _EPS, row_norm)[:, None]
                      / tl.where(col_norm < _EPS, _EPS, col_norm)[None, :])
            other = in_cols
            if HAS_VMASK:
                other &= tl.load(vmask_ptr + b * s_vmb + cols * s_vmn, mask=in_cols, other=0) != 0
            other2 = other[None, :] & (rows[:, None] != cols[None, :]) & (cosine == cosine)
            nearest = tl.maximum(nearest, tl.max(tl.where(other2, cosine, float("-inf")), axis=1))
    if NEED_NEAREST:
        tl.store(nearest_ptr + (b * n_groups + group) * N + rows, nearest, mask=in_rows)


@triton.jit
def _prepare_kernel(visual_ptr, prompt_ptr, pmask_ptr, vmask_ptr, part_ptr, psq_ptr, fill_ptr,
                    counts_ptr, gram_ptr, nearest_ptr, B, N, D, T, n_core, n_splits, split_len,
                    tiles_per_group, n_groups,
                    s_vb, s_vn, s_pb, s_pt, s_pmb, s_pmt, s_vmb, s_vmn,
                    HAS_PMASK: tl.constexpr, HAS_VMASK: tl.constexpr,
                    STORE_GRAM: tl.constexpr, NEED_NEAREST: tl.constexpr, DOT_FP32: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr):
    """Launch 1, grid (row tiles, n_splits + n_groups, B). Outputs (float32 unless said):
    part [B, 2, n_splits, N] (squared norms, dots with the prompt sum), psq [B, n_splits],
    fill [B, N] seeded 0 / PADDING, counts int32 [3, B] (core size, zeroed barrier counter,
    real prompt tokens); gram [B, N, N] raw dot products if STORE_GRAM; nearest
    [B, n_groups, N], the largest cosine to another real token, if NEED_NEAREST."""
    tile_m = tl.program_id(0)
    job = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if job < n_splits:
        _row_stats(visual_ptr, prompt_ptr, pmask_ptr, vmask_ptr, part_ptr, psq_ptr, fill_ptr,
                   counts_ptr, b, B, tile_m, job, n_splits, split_len, N, D, T, n_core,
                   s_vb, s_vn, s_pb, s_pt, s_pmb, s_pmt, s_vmb, s_vmn,
                   HAS_PMASK, HAS_VMASK, BM, BK, BT)
    else:
        _gram_group(visual_ptr, vmask_ptr, gram_ptr, nearest_ptr, b, tile_m, job - n_splits, N,
                    D, tiles_per_group, n_groups, s_vb, s_vn, s_vmb, s_vmn,
                    HAS_VMASK, STORE_GRAM, NEED_NEAREST, DOT_FP32, BM, BK)


@triton.jit
def _first_key(rel, fill, nearest_ptr, b, offs, inside, N, n_groups, n_core,
               NEED_NEAREST: tl.constexpr):
    """Key of the first pick: relevance if the row has a core, else DivPrune's."""
    key = rel
    if NEED_NEAREST:
        nearest = tl.full(offs.shape, float("-inf"), tl.float32)
        for g in range(0, n_groups):
            nearest = tl.maximum(nearest, tl.load(nearest_ptr + (b * n_groups + g) * N + offs,
                                                  mask=inside, other=float("-inf")))
        divprune = tl.where(fill == float("inf"), 1.0 - nearest, fill)  # no other: +inf
        key = tl.where(n_core > 0, rel, divprune)
    return key


@triton.jit
def _update(rel, fill, offs, pick, distance):
    """Mark ``pick`` chosen (-inf in both keys) and lower the fill key to ``distance``."""
    distance = tl.where(distance < -1.0, -1.0, distance)  # only -inf from overflow: keep off -inf
    taken = offs == pick
    rel = tl.where(taken, float("-inf"), rel)
    fill = tl.where(taken, float("-inf"), tl.where(distance < fill, distance, fill))  # fmin
    return rel, fill


@triton.jit
def _pick_inverse_norm(part_ptr, b, pick, N, n_splits):
    """The inverse norm of token ``pick``, summed from launch 1's partials like _token_keys."""
    squares = tl.zeros([], tl.float32)
    for j in range(0, n_splits):
        squares += tl.load(part_ptr + ((b * 2) * n_splits + j) * N + pick)
    norm = tl.sqrt(squares)
    return 1.0 / tl.where(norm < _EPS, _EPS, norm)


@triton.jit
def _select_gram_kernel(gram_ptr, part_ptr, psq_ptr, counts_ptr, fill_ptr, nearest_ptr, out_ptr,
                        B, N, keep, n_splits, n_groups, NEED_NEAREST: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Launch 2 with the Gram scratch: one program per image, all N keys in registers."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < N
    inv, rel, fill = _token_keys(part_ptr, psq_ptr, counts_ptr, fill_ptr, b, B, offs, inside, N,
                                 n_splits)
    n_core = tl.load(counts_ptr + b)
    key = _first_key(rel, fill, nearest_ptr, b, offs, inside, N, n_groups, n_core, NEED_NEAREST)
    pick = tl.argmax(key, axis=0)
    for step in range(0, keep):
        row = tl.load(gram_ptr + (b * N + pick) * N + offs, mask=inside, other=0.0)
        inv_pick = _pick_inverse_norm(part_ptr, b, pick, N, n_splits)
        rel, fill = _update(rel, fill, offs, pick, 1.0 - row * inv_pick * inv)
        pick = tl.argmax(tl.where(step + 1 < n_core, rel, fill), axis=0)
    chosen = inside & (fill == float("-inf"))
    position = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + b * keep + position, offs.to(tl.int64), mask=chosen)


@triton.jit
def _running_argmax(key, offs, best, best_index):
    """Fold one block into a running (max, first index of max): earlier blocks win ties."""
    block_best = tl.max(key, axis=0)
    block_index = tl.min(tl.where(key == block_best, offs, 2147483647), axis=0)
    better = block_best > best
    return tl.where(better, block_best, best), tl.where(better, block_index, best_index)


@triton.jit
def _grid_argmax(best, index, cand_val_ptr, cand_idx_ptr, sync_ptr, b, part, P, phase, failed,
                 PMAX: tl.constexpr):
    """Global (max, lowest index) over the P programs of image ``b``: each posts its candidate,
    then waits until all P have posted for this phase (a spin on an atomic counter). With
    P = 1 the wait ends at once (the only path Triton's interpreter can run). The spin is capped:
    a grid that is not co-resident marks the row failed (-1 picks) instead of hanging."""
    slot = (b * 2 + phase % 2) * PMAX  # two slots: a fast program never overwrites a live one
    tl.store(cand_val_ptr + slot + part, best)
    tl.store(cand_idx_ptr + slot + part, index)
    tl.debug_barrier()
    tl.atomic_add(sync_ptr + b, 1, sem="acq_rel", scope="gpu")
    target = P * (phase + 1)
    arrived = tl.atomic_add(sync_ptr + b, 0, sem="acquire", scope="gpu")
    spins = 0
    while (arrived < target) & (spins < _MAX_SPINS):
        arrived = tl.atomic_add(sync_ptr + b, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()
    parts = tl.arange(0, PMAX)
    values = tl.load(cand_val_ptr + slot + parts, mask=parts < P, other=float("-inf"),
                     volatile=True)
    indices = tl.load(cand_idx_ptr + slot + parts, mask=parts < P, other=2147483647,
                      volatile=True)
    top = tl.max(values, axis=0)
    return tl.min(tl.where(values == top, indices, 2147483647), axis=0), failed | (arrived < target)


@triton.jit
def _select_stream_kernel(visual_ptr, part_ptr, psq_ptr, counts_ptr, inv_ptr, rel_ptr,
                          fill_ptr, nearest_ptr, cand_val_ptr, cand_idx_ptr, out_ptr, B, N, D,
                          keep, n_splits, n_groups, P, slice_len, s_vb, s_vn,
                          NEED_NEAREST: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, PMAX: tl.constexpr):
    """Launch 2 without a Gram scratch, grid (P, B): program ``part`` of image ``b`` owns the
    tokens [part * slice_len, (part + 1) * slice_len); each step it computes the chosen token's
    cosines to them from the features, updates their keys in rel/fill [B, N] and joins the
    image's grid-wide argmax. P > 1 needs all B * P programs resident at once (the glue sizes
    the grid to the SM count)."""
    part = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    lo = part * slice_len
    hi = tl.minimum(lo + slice_len, N)
    n_core = tl.load(counts_ptr + b)
    sync_ptr = counts_ptr + B
    failed = tl.full([], 0, tl.int1)
    best = tl.full([], float("-inf"), tl.float32)
    pick = tl.full([], 0, tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        inside = offs < hi
        inv, rel, fill = _token_keys(part_ptr, psq_ptr, counts_ptr, fill_ptr, b, B, offs, inside,
                                     N, n_splits)
        tl.store(inv_ptr + b * N + offs, inv, mask=inside)
        tl.store(rel_ptr + b * N + offs, rel, mask=inside)
        tl.store(fill_ptr + b * N + offs, fill, mask=inside)
        key = _first_key(rel, fill, nearest_ptr, b, offs, inside, N, n_groups, n_core,
                         NEED_NEAREST)
        best, pick = _running_argmax(key, offs, best, pick)
    tl.debug_barrier()  # the steps read the keys stored above
    pick, failed = _grid_argmax(best, pick, cand_val_ptr, cand_idx_ptr, sync_ptr, b, part, P, 0,
                                failed, PMAX)
    for step in range(0, keep):
        pick_ptr = visual_ptr + b * s_vb + pick * s_vn
        inv_pick = _pick_inverse_norm(part_ptr, b, pick, N, n_splits)
        best = tl.full([], float("-inf"), tl.float32)
        next_pick = tl.full([], 0, tl.int32)
        for n0 in range(lo, hi, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            inside = offs < hi
            dots = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                in_d = ds < D
                # the chosen row is scaled first, so a finite-norm token's dot cannot overflow
                u = tl.load(pick_ptr + ds, mask=in_d, other=0.0).to(tl.float32) * inv_pick
                v = tl.load(visual_ptr + b * s_vb + offs[:, None] * s_vn + ds[None, :],
                            mask=inside[:, None] & in_d[None, :], other=0.0).to(tl.float32)
                dots += tl.sum(v * u[None, :], axis=1)
            inv = tl.load(inv_ptr + b * N + offs, mask=inside, other=0.0)
            rel = tl.load(rel_ptr + b * N + offs, mask=inside, other=float("-inf"))
            fill = tl.load(fill_ptr + b * N + offs, mask=inside, other=float("-inf"))
            rel, fill = _update(rel, fill, offs, pick, 1.0 - dots * inv)
            tl.store(rel_ptr + b * N + offs, rel, mask=inside)
            tl.store(fill_ptr + b * N + offs, fill, mask=inside)
            best, next_pick = _running_argmax(tl.where(step + 1 < n_core, rel, fill), offs,
                                              best, next_pick)
        tl.debug_barrier()  # the next step reads the keys this one stored
        pick, failed = _grid_argmax(best, next_pick, cand_val_ptr, cand_idx_ptr, sync_ptr, b,
                                    part, P, step + 1, failed, PMAX)
    # a last phase: every program's keys are stored before program 0 reads them all
    _, failed = _grid_argmax(best, pick, cand_val_ptr, cand_idx_ptr, sync_ptr, b, part, P,
                             keep + 1, failed, PMAX)
    if part == 0:
        written = tl.full([], 0, tl.int32)
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            inside = offs < N
            fill = tl.load(fill_ptr + b * N + offs, mask=inside, other=0.0, volatile=True)
            chosen = inside & (fill == float("-inf"))
            position = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + b * keep + position, tl.where(failed, -1, offs.to(tl.int64)),
                     mask=chosen)
            written += tl.sum(chosen.to(tl.int32), axis=0)


def uses_gram(batch: int, n: int) -> bool:
    """Whether launch 2 walks a float32 [B, N, N] Gram scratch (moderate N, bounded bytes)."""
    return n <= GRAM_MAX_N and batch * n * n * 4 <= GRAM_MAX_BYTES


def needs_first_pick(prompt_len: int, keep: int, relevance_ratio: float,
                     has_prompt_mask: bool) -> bool:
    """Whether some row may start with an empty core (DivPrune's first pick), statically."""
    return has_prompt_mask or prompt_len == 0 or core_size(keep, relevance_ratio) == 0


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
    nearest_needed = needs_first_pick(T, keep, relevance_ratio, prompt_mask is not None)
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
            _select_gram_kernel[(B,)](gram_scratch, part, psq, counts, fill, nearest, picks,
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
