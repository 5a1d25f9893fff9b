"""Launch 1 of the fused selection: per-token partial sums and, where needed, Gram tiles.

Fully parallel, grid (row tiles, feature splits + column groups, B). The row statistics are
split over the features (each program sums a slice of D for 64 tokens and the whole prompt), so
no program walks D x T alone; launch 2 adds the partial sums up. Gram tiles are raw dot products
``V V^T`` on tensor cores with float32 accumulation (float32 inputs use exact ``ieee`` products,
never tf32: they decide picks).
"""
import triton
import triton.language as tl

from zspaprune_ops.rule import NORM_EPS, PADDING

_PADDING = tl.constexpr(PADDING)
_EPS = tl.constexpr(NORM_EPS)


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
