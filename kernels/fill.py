"""Launch 2 of the fused selection: core top-k and farthest-point fill, one step per keep.

Keys (float32, larger = taken first): relevance for the core, the running minimum cosine
distance for the fill, the rule's sentinels DEMOTED / PADDING for unscorable / padded tokens and
-inf once chosen. Ties go to the lower index everywhere (``tl.argmax`` keeps the first maximum;
block and grid reductions keep the lowest index among equal maxima). The chosen tokens end with
fill key -inf, and a prefix sum writes their indices in ascending order: no sort is launched.
"""
import triton
import triton.language as tl

from zspaprune_ops.rule import DEMOTED, NORM_EPS, PADDING

_DEMOTED = tl.constexpr(DEMOTED)
_PADDING = tl.constexpr(PADDING)
_EPS = tl.constexpr(NORM_EPS)
_MAX_SPINS = tl.constexpr(1 << 26)
"""Cap on a grid-barrier wait (seconds of spinning): past it the row reports failure."""


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
def _select_gram_kernel(gram_ptr, part_ptr, psq_ptr, counts_ptr, inv_ptr, fill_ptr, nearest_ptr,
                        out_ptr, B, N, keep, n_splits, n_groups, NEED_NEAREST: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Launch 2 with the Gram scratch: one program per image, all N keys in registers; a step
    is one Gram row load (plus the chosen token's inverse norm), an update and an argmax."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < N
    inv, rel, fill = _token_keys(part_ptr, psq_ptr, counts_ptr, fill_ptr, b, B, offs, inside, N,
                                 n_splits)
    tl.store(inv_ptr + b * N + offs, inv, mask=inside)
    tl.debug_barrier()  # each step reads the chosen token's inverse norm back
    n_core = tl.load(counts_ptr + b)
    key = _first_key(rel, fill, nearest_ptr, b, offs, inside, N, n_groups, n_core, NEED_NEAREST)
    pick = tl.argmax(key, axis=0)
    for step in range(0, keep):
        row = tl.load(gram_ptr + (b * N + pick) * N + offs, mask=inside, other=0.0)
        inv_pick = tl.load(inv_ptr + b * N + pick)
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
    while (arrived < target) & (spins < _MAX_SPINS) & (failed == 0):  # one timeout ends waits
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
        ok = 1 - failed.to(tl.int32)  # a failed row is all -1, never partly written
        written = tl.full([], 0, tl.int32)
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            inside = offs < N
            fill = tl.load(fill_ptr + b * N + offs, mask=inside, other=0.0, volatile=True)
            chosen = inside & (fill == float("-inf"))
            position = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + b * keep + position, offs.to(tl.int64),
                     mask=chosen & (position < keep) & (position * 0 + ok != 0))
            written += tl.sum(chosen.to(tl.int32), axis=0)
        for k0 in range(0, keep, BLOCK_N):
            ks = k0 + tl.arange(0, BLOCK_N)
            tl.store(out_ptr + b * keep + ks, tl.full([BLOCK_N], -1, tl.int64),
                     mask=(ks < keep) & (ks * 0 + ok == 0))
