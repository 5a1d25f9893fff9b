"""Launches 0 and 1 of the fused selection: the prompt sum, then per-token partial sums and,
where needed, Gram tiles.

Launch 0 (``_prompt_kernel``, grid (feature blocks, B)) sums the real prompt tokens once per
image, so no later program walks T; it also counts them and resets launch 2's barrier.
Launch 1 (``_prepare_kernel``, grid (row tiles, feature splits + column groups, B)) is fully
parallel: each row-statistics program sums a slice of D for 64 tokens (launch 2 adds the slices
up); Gram tiles are raw dot products ``V V^T`` on tensor cores with float32 accumulation
(float32 inputs use exact ``ieee`` products, never tf32: they decide picks).
"""
import triton
import triton.language as tl

from zspaprune_ops.rule import NORM_EPS, PADDING

_PADDING = tl.constexpr(PADDING)
_EPS = tl.constexpr(NORM_EPS)


@triton.jit(do_not_specialize=["T", "n_sync", "keep", "s_pb", "s_pmb", "s_pmt"],
            do_not_specialize_on_alignment=["pmask_ptr", "out_ptr"])
def _prompt_kernel(prompt_ptr, pmask_ptr, psum_ptr, counts_ptr, sync_ptr, out_ptr, T, D, n_sync,
                   keep, s_pb, s_pt, s_pmb, s_pmt, HAS_PMASK: tl.constexpr, BD: tl.constexpr,
                   BT: tl.constexpr):
    """Launch 0, grid (ceil(D / BD), B): psum [B, D] float32, the sum of the real prompt tokens;
    counts int32 [B], how many there are; sync int64 [B, n_sync]: word 0 (launch 2's barrier)
    reset when n_sync > 0; out int64 [B, keep]: every row -1 until launch 2 writes it."""
    block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ds = block * BD + tl.arange(0, BD)
    in_d = ds < D
    total = tl.zeros([BD], tl.float32)
    count = tl.zeros([BT], tl.int32)
    for t0 in range(0, T, BT):  # BT rows per load: few dependent loads even at T = 2900
        ts = t0 + tl.arange(0, BT)
        real = ts < T
        if HAS_PMASK:
            real &= tl.load(pmask_ptr + b * s_pmb + ts * s_pmt, mask=real, other=0) != 0
        rows = prompt_ptr + b * s_pb + ts.to(tl.int64)[:, None] * s_pt
        p = tl.load(rows + ds[None, :], mask=real[:, None] & in_d[None, :], other=0.0)
        total += tl.sum(p.to(tl.float32), axis=0)
        count += real.to(tl.int32)
    tl.store(psum_ptr + b * D + ds, total, mask=in_d)
    if block == 0:
        tl.store(counts_ptr + b, tl.sum(count, axis=0))
    if (block == 0) & (n_sync > 0):
        tl.store(sync_ptr + b * n_sync, tl.zeros([], tl.int64))
    if block == 0:
        for k0 in range(0, keep, BT):
            ks = k0 + tl.arange(0, BT)
            tl.store(out_ptr + b * keep + ks, tl.full([BT], -1, tl.int64), mask=ks < keep)


@triton.jit
def _row_stats(visual_ptr, vmask_ptr, psum_ptr, part_ptr, psq_ptr, fill_ptr, b, tile_m, split,
               n_splits, split_len, N, D, s_vb, s_vn, s_vmb, s_vmn, HAS_VMASK: tl.constexpr,
               BM: tl.constexpr, BK: tl.constexpr):
    """Partial sums over one feature split: squared norms and dot products with the prompt sum
    per row, the prompt sum's squared norm (row tile 0); split 0 also seeds the fill key
    (0 real, PADDING padded)."""
    rows = tile_m * BM + tl.arange(0, BM)
    in_rows = rows < N
    row_ptr = visual_ptr + b * s_vb + rows.to(tl.int64)[:, None] * s_vn
    squares = tl.zeros([BM], tl.float32)
    dots = tl.zeros([BM], tl.float32)
    prompt_squares = tl.zeros([BK], tl.float32)
    first = split * split_len
    for k0 in range(first, tl.minimum(first + split_len, D), BK):
        ks = k0 + tl.arange(0, BK)
        in_k = ks < D
        v = tl.load(row_ptr + ks[None, :], mask=in_rows[:, None] & in_k[None, :],
                    other=0.0).to(tl.float32)
        prompt_sum = tl.load(psum_ptr + b * D + ks, mask=in_k, other=0.0)
        squares += tl.sum(v * v, axis=1)
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


@triton.jit
def _tile_dot(visual_ptr, b, rows, cols, N, D, s_vb, s_vn, SQUARES: tl.constexpr,
              DOT_FP32: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Raw dot products V[rows] V[cols]^T of one tile (float32 accumulation) and, if SQUARES,
    the rows' and columns' squared norms summed in the same K loop."""
    row_ptr = visual_ptr + b * s_vb + rows.to(tl.int64)[:, None] * s_vn
    col_ptr = visual_ptr + b * s_vb + cols.to(tl.int64)[:, None] * s_vn
    gram = tl.zeros([BM, BM], tl.float32)
    row_squares = tl.zeros([BM], tl.float32)
    col_squares = tl.zeros([BM], tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        in_k = ks < D
        a = tl.load(row_ptr + ks[None, :], mask=(rows < N)[:, None] & in_k[None, :], other=0.0)
        c = tl.load(col_ptr + ks[None, :], mask=(cols < N)[:, None] & in_k[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            c = c.to(tl.float32)
        gram = tl.dot(a, tl.trans(c), gram, input_precision="ieee")
        if SQUARES:  # cheap beside the dot: no branch in the K loop
            a32 = a.to(tl.float32)
            c32 = c.to(tl.float32)
            row_squares += tl.sum(a32 * a32, axis=1)
            col_squares += tl.sum(c32 * c32, axis=1)
    return gram, row_squares, col_squares


@triton.jit
def _cosine(gram, row_squares, col_squares):
    row_norm = tl.sqrt_rn(row_squares)
    col_norm = tl.sqrt_rn(col_squares)
    return tl.div_rn(tl.div_rn(gram, tl.where(row_norm < _EPS, _EPS, row_norm)[:, None]),
                     tl.where(col_norm < _EPS, _EPS, col_norm)[None, :])


@triton.jit
def _real(vmask_ptr, b, tokens, N, s_vmb, s_vmn, HAS_VMASK: tl.constexpr):
    real = tokens < N
    if HAS_VMASK:
        real &= tl.load(vmask_ptr + b * s_vmb + tokens * s_vmn, mask=real, other=0) != 0
    return real


@triton.jit
def _nearest_of_rows(cosine, rows, cols, col_real):
    """Each row's largest cosine to another real column (diagonal and NaN excluded)."""
    other = col_real[None, :] & (rows[:, None] != cols[None, :]) & (cosine == cosine)
    return tl.max(tl.where(other, cosine, float("-inf")), axis=1)


@triton.jit
def _gram_tile(visual_ptr, vmask_ptr, gram_ptr, nearest_ptr, b, tile_m, tile_n, N, D, n_groups,
               s_vb, s_vn, s_vmb, s_vmn, need_nearest, HAS_VMASK: tl.constexpr,
               NEED_NEAREST: tl.constexpr, DOT_FP32: tl.constexpr, BM: tl.constexpr,
               BK: tl.constexpr):
    """Gram mode: tile (tile_m, tile_n) of the upper triangle (programs below it end at once),
    stored with its mirror, so each pair of features is multiplied once. With NEED_NEAREST (for
    an image whose first pick is DivPrune's), the tile's row maxima go to nearest group tile_n
    and, off the diagonal, its column maxima to group tile_m: every (group, token) slot of the
    [B, tiles, N] maxima is written by exactly one program."""
    if tile_n >= tile_m:
        rows = tile_m * BM + tl.arange(0, BM)
        cols = tile_n * BM + tl.arange(0, BM)
        in_rows = rows < N
        in_cols = cols < N
        gram, row_squares, col_squares = _tile_dot(visual_ptr, b, rows, cols, N, D, s_vb, s_vn,
                                                   NEED_NEAREST, DOT_FP32, BM, BK)
        tile = in_rows[:, None] & in_cols[None, :]
        tl.store(gram_ptr + (b * N + rows[:, None]) * N + cols[None, :], gram, mask=tile)
        if tile_n != tile_m:
            tl.store(gram_ptr + (b * N + cols[:, None]) * N + rows[None, :], tl.trans(gram),
                     mask=tl.trans(tile))
        if NEED_NEAREST:
            if need_nearest:
                cosine = _cosine(gram, row_squares, col_squares)
                col_real = _real(vmask_ptr, b, cols, N, s_vmb, s_vmn, HAS_VMASK)
                tl.store(nearest_ptr + (b * n_groups + tile_n) * N + rows,
                         _nearest_of_rows(cosine, rows, cols, col_real), mask=in_rows)
                if tile_n != tile_m:
                    row_real = _real(vmask_ptr, b, rows, N, s_vmb, s_vmn, HAS_VMASK)
                    tl.store(nearest_ptr + (b * n_groups + tile_m) * N + cols,
                             _nearest_of_rows(tl.trans(cosine), cols, rows, row_real),
                             mask=in_cols)


@triton.jit
def _nearest_group(visual_ptr, vmask_ptr, nearest_ptr, b, tile_m, group, N, D, tiles_per_group,
                   n_groups, s_vb, s_vn, s_vmb, s_vmn, HAS_VMASK: tl.constexpr,
                   DOT_FP32: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Streaming mode (no Gram scratch): one row tile against a group of column tiles, reduced
    to each row's largest cosine to another real token, for DivPrune's first pick."""
    rows = tile_m * BM + tl.arange(0, BM)
    nearest = tl.full([BM], float("-inf"), tl.float32)
    first = group * tiles_per_group
    for tile_n in range(first, tl.minimum(first + tiles_per_group, tl.cdiv(N, BM))):
        cols = tile_n * BM + tl.arange(0, BM)
        gram, row_squares, col_squares = _tile_dot(visual_ptr, b, rows, cols, N, D, s_vb, s_vn,
                                                   True, DOT_FP32, BM, BK)
        col_real = _real(vmask_ptr, b, cols, N, s_vmb, s_vmn, HAS_VMASK)
        nearest = tl.maximum(nearest, _nearest_of_rows(_cosine(gram, row_squares, col_squares),
                                                       rows, cols, col_real))
    tl.store(nearest_ptr + (b * n_groups + group) * N + rows, nearest, mask=rows < N)


@triton.jit(do_not_specialize=["N", "n_core", "n_splits", "tiles_per_group", "n_groups", "s_vb",
                               "s_vmb", "s_vmn"],
            do_not_specialize_on_alignment=["vmask_ptr"])
def _prepare_kernel(visual_ptr, vmask_ptr, psum_ptr, counts_ptr, part_ptr, psq_ptr, fill_ptr,
                    gram_ptr, nearest_ptr, N, D, n_core, n_splits, split_len, tiles_per_group,
                    n_groups, s_vb, s_vn, s_vmb, s_vmn,
                    HAS_VMASK: tl.constexpr, STORE_GRAM: tl.constexpr,
                    NEED_NEAREST: tl.constexpr, DOT_FP32: tl.constexpr, BM: tl.constexpr,
                    BK: tl.constexpr):
    """Launch 1, grid (row tiles, n_splits + n_groups, B). Reads launch 0's psum and counts.
    Outputs (float32): part [B, 2, n_splits, N] (squared norms, dots with the prompt sum),
    psq [B, n_splits], fill [B, N] seeded 0 / PADDING; gram [B, N, N] raw dot products if
    STORE_GRAM; nearest [B, n_groups, N], the largest cosine to another real token, for the
    images that start with DivPrune's pick (no real prompt token, or an empty core), if
    NEED_NEAREST (a job of an image that does not need it ends at once)."""
    tile_m = tl.program_id(0)
    job = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if job < n_splits:
        _row_stats(visual_ptr, vmask_ptr, psum_ptr, part_ptr, psq_ptr, fill_ptr, b, tile_m, job,
                   n_splits, split_len, N, D, s_vb, s_vn, s_vmb, s_vmn, HAS_VMASK, BM, BK)
    else:
        need_nearest = (tl.load(counts_ptr + b) == 0) | (n_core == 0)
        if STORE_GRAM:
            _gram_tile(visual_ptr, vmask_ptr, gram_ptr, nearest_ptr, b, tile_m, job - n_splits,
                       N, D, n_groups, s_vb, s_vn, s_vmb, s_vmn, need_nearest, HAS_VMASK,
                       NEED_NEAREST, DOT_FP32, BM, BK)
        elif NEED_NEAREST:
            if need_nearest:
                _nearest_group(visual_ptr, vmask_ptr, nearest_ptr, b, tile_m, job - n_splits, N,
                               D, tiles_per_group, n_groups, s_vb, s_vn, s_vmb, s_vmn,
                               HAS_VMASK, DOT_FP32, BM, BK)
