"""Launch 2 of the fused selection: core top-k and farthest-point fill, one step per keep.

Keys (float32, larger = taken first): relevance for the core, the running minimum cosine
distance for the fill, the rule's sentinels DEMOTED / PADDING for unscorable / padded tokens and
-inf once chosen. Ties go to the lower index everywhere (``tl.argmax`` keeps the first maximum;
block and grid reductions keep the lowest index among equal maxima). The chosen tokens end with
fill key -inf, and a prefix sum writes their indices in ascending order: no sort is launched.
Key arithmetic uses round-to-nearest division and square root (``div_rn`` / ``sqrt_rn``) and
the launches turn FMA contraction off, so picks do not depend on compiler defaults.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

from zspaprune_ops.rule import DEMOTED, NORM_EPS, PADDING

_DEMOTED = tl.constexpr(DEMOTED)
_PADDING = tl.constexpr(PADDING)
_EPS = tl.constexpr(NORM_EPS)
_WAIT_NS = tl.constexpr(100_000_000)
"""Longest wait at a grid-wide argmax (100 ms) before the image is marked failed."""
_LOW = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _inverse_norm(squares):
    """1 / max(sqrt(squares), eps), correctly rounded; NaN stays NaN."""
    norm = tl.sqrt_rn(squares)
    return norm, tl.div_rn(tl.full(norm.shape, 1.0, tl.float32), tl.where(norm < _EPS, _EPS, norm))


@triton.jit
def _token_keys(part_ptr, psq_ptr, fill_ptr, b, offs, inside, N, n_splits, count):
    """Launch 1's partial sums -> per token: inverse norm, relevance key and fill key (the
    rule's sentinels; -inf outside [0, N)). ``count``: the image's real prompt tokens."""
    squares = tl.zeros(offs.shape, tl.float32)
    dots = tl.zeros(offs.shape, tl.float32)
    prompt_squares = tl.zeros([], tl.float32)
    for j in range(0, n_splits):
        squares += tl.load(part_ptr + ((b * 2) * n_splits + j) * N + offs, mask=inside, other=0.0)
        dots += tl.load(part_ptr + ((b * 2 + 1) * n_splits + j) * N + offs, mask=inside,
                        other=0.0)
        prompt_squares += tl.load(psq_ptr + b * n_splits + j)
    real = inside & (tl.load(fill_ptr + b * N + offs, mask=inside, other=_PADDING) == 0.0)
    norm, inv = _inverse_norm(squares)
    scorable = norm < float("inf")  # False for NaN and Inf norms
    # relevance = v_hat . p_hat with p_hat = mean / max(|mean|, eps), mean = sum / count
    count = tl.maximum(count, 1).to(tl.float32)
    mean_norm = tl.div_rn(tl.sqrt_rn(prompt_squares), count)
    relevance = tl.div_rn(dots * inv, count * tl.where(mean_norm < _EPS, _EPS, mean_norm))
    unscored = relevance != relevance  # test before clamping: min/max drop NaN
    # keep overflowed scores off the sentinels (only features beyond ~1e19 get here)
    relevance = tl.minimum(tl.maximum(relevance, -1.5), 1.5)
    relevance = tl.where(scorable & ~unscored, relevance, _DEMOTED)
    relevance = tl.where(real, relevance, _PADDING)
    fill = tl.where(real, tl.where(scorable, float("inf"), _DEMOTED), _PADDING)
    return (inv, tl.where(inside, relevance, float("-inf")),
            tl.where(inside, fill, float("-inf")))


@triton.jit
def _first_key(rel, fill, nearest_ptr, b, offs, inside, N, n_groups, n_core,
               NEED_NEAREST: tl.constexpr):
    """Key of the first pick: relevance if the image has a core, else DivPrune's."""
    key = rel
    if NEED_NEAREST:
        if n_core == 0:
            nearest = tl.full(offs.shape, float("-inf"), tl.float32)
            for g in range(0, n_groups):
                nearest = tl.maximum(nearest, tl.load(nearest_ptr + (b * n_groups + g) * N + offs,
                                                      mask=inside, other=float("-inf")))
            key = tl.where(fill == float("inf"), 1.0 - nearest, fill)  # no other: +inf
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
    return _inverse_norm(squares)[1]


@triton.jit
def _image_core(counts_ptr, b, n_core):
    """The image's real prompt tokens and core size (0 without a real prompt token)."""
    count = tl.load(counts_ptr + b)
    return count, tl.where(count > 0, n_core, 0)


@triton.jit
def _lower_by_rows(fill, offs, picks, valid, distance):
    """Mark ``picks`` (where ``valid``) chosen and lower the fill keys to the smallest of their
    ``distance`` rows [R, BLOCK]: the same keys as one ``_update`` per row, in any order (a min
    is order-free; NaN distances are ignored, as fmin does)."""
    distance = tl.where(valid[:, None] & (distance == distance), distance, float("inf"))
    nearest = tl.min(distance, axis=0)
    nearest = tl.where(nearest < -1.0, -1.0, nearest)  # only -inf from overflow: keep off -inf
    taken = tl.sum(((offs[None, :] == picks[:, None]) & valid[:, None]).to(tl.int32), axis=0)
    return tl.where(taken > 0, float("-inf"), tl.where(nearest < fill, nearest, fill))


@triton.jit
def _select_gram_kernel(gram_ptr, part_ptr, psq_ptr, counts_ptr, inv_ptr, fill_ptr, nearest_ptr,
                        out_ptr, N, keep, n_core, n_splits, n_groups,
                        NEED_NEAREST: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Launch 2 with the Gram scratch: one program per image, all N keys in registers.

    The relevance core needs no distances: its picks are successive argmaxes of the relevance
    alone (no load between them), and the fill keys then take the core's Gram rows ROWS at a
    time (ROWS loads in flight instead of one dependent load per pick). A fill step is one Gram
    row load (plus the chosen token's inverse norm), an update and an argmax."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < N
    count, n_core = _image_core(counts_ptr, b, n_core)
    inv, rel, fill = _token_keys(part_ptr, psq_ptr, fill_ptr, b, offs, inside, N, n_splits, count)
    tl.store(inv_ptr + b * N + offs, inv, mask=inside)
    for step in range(0, n_core):  # the core, in pick order, parked in the output row
        pick = tl.argmax(rel, axis=0)
        rel = tl.where(offs == pick, float("-inf"), rel)
        tl.store(out_ptr + b * keep + step, pick.to(tl.int64))
    tl.debug_barrier()  # the core's picks and every inverse norm are read back below
    for j0 in range(0, n_core, ROWS):
        js = j0 + tl.arange(0, ROWS)
        valid = js < n_core
        picks = tl.load(out_ptr + b * keep + js, mask=valid, other=0)
        rows = tl.load(gram_ptr + (b * N + picks[:, None]) * N + offs[None, :],
                       mask=valid[:, None] & inside[None, :], other=0.0)
        inv_picks = tl.load(inv_ptr + b * N + picks, mask=valid, other=0.0)
        fill = _lower_by_rows(fill, offs, picks, valid,
                              1.0 - rows * inv_picks[:, None] * inv[None, :])
    key = _first_key(fill, fill, nearest_ptr, b, offs, inside, N, n_groups, n_core,
                     NEED_NEAREST)  # DivPrune's first pick where the core is empty
    pick = tl.argmax(key, axis=0)
    for step in range(n_core, keep):
        row = tl.load(gram_ptr + (b * N + pick) * N + offs, mask=inside, other=0.0)
        inv_pick = tl.load(inv_ptr + b * N + pick)
        rel, fill = _update(rel, fill, offs, pick, 1.0 - row * inv_pick * inv)
        pick = tl.argmax(fill, axis=0)
    chosen = inside & (fill == float("-inf"))
    position = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.debug_barrier()  # every read of the parked core is done before the row is written
    tl.store(out_ptr + b * keep + position, offs.to(tl.int64), mask=chosen)


@triton.jit
def _running_argmax(key, offs, best, best_index):
    """Fold one block into a running (max, first index of max): earlier blocks win ties."""
    block_best = tl.max(key, axis=0)
    block_index = tl.min(tl.where(key == block_best, offs, 2147483647), axis=0)
    better = block_best > best
    return tl.where(better, block_best, best), tl.where(better, block_index, best_index)


@triton.jit
def _pack(key, index):
    """(key, index) -> int64 whose signed order is the key's float order, then the lower index
    (keys are never NaN; -0.0 is made +0.0 so that it ties with +0.0 as floats do)."""
    bits = tl.where(key == 0.0, 0.0, key).to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (index.to(tl.int64) ^ _LOW)  # low word: ~index


@triton.jit
def _grid_argmax(sync_ptr, best, index, P, phase, ok, N, INTERPRETED: tl.constexpr):
    """The (max, lowest index) of image b over its P programs, through one packed 64-bit
    ``atomic_max`` into this phase's slot (reset by launch 0) and an arrival counter.

    sync_ptr: the image's int64 sync words (0: arrivals, 1: failure flag, 2 + phase: slots).
    Returns (pick, ok). A wait longer than 100 ms, or a failure flagged by another program,
    makes ``ok`` False for good; the pick is then 0, so it never addresses memory out of range.
    With P = 1 nothing waits. Triton's interpreter, which runs programs one after another, has
    no GPU timer: there each poll counts as 0.1 ms, so a forced P > 1 fails after 1000 polls."""
    slot = sync_ptr + 2 + phase
    tl.atomic_max(slot, _pack(best, index), sem="relaxed", scope="gpu")
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")  # after the max: release orders it
    target = P * (phase + 1)
    arrived = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    waited = tl.zeros([], tl.int64)
    last = tl.zeros([], tl.int64)
    while (arrived < target) & ok:
        arrived = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        if INTERPRETED:
            waited += _WAIT_NS // 1000
        else:
            now = globaltimer()
            waited += tl.where(last == 0, 0, now - last)
            last = now
        flagged = tl.atomic_add(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
        ok = (flagged == 0) & (waited < _WAIT_NS)
    if arrived < target:  # this program gave up: tell the others, they stop waiting too
        tl.atomic_xchg(sync_ptr + 1, 1, sem="relaxed", scope="gpu")
    packed = tl.atomic_add(slot, 0, sem="acquire", scope="gpu")
    pick = ((packed & _LOW) ^ _LOW).to(tl.int32)
    ok = ok & (arrived >= target) & (pick >= 0) & (pick < N)
    return tl.where(ok, pick, 0), ok


@triton.jit
def _slice_argmax(key_ptr, b, lo, hi, N, BLOCK_N: tl.constexpr):
    """(max, lowest index of max) of the keys [B, N] of tokens [lo, hi)."""
    best = tl.full([], float("-inf"), tl.float32)
    index = tl.full([], 0, tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        key = tl.load(key_ptr + b * N + offs, mask=offs < hi, other=float("-inf"))
        best, index = _running_argmax(key, offs, best, index)
    return best, index


@triton.jit
def _fill_step(visual_ptr, part_ptr, inv_ptr, rel_ptr, fill_ptr, b, lo, hi, N, D, n_splits,
               pick, s_vb, s_vn, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One fill step over tokens [lo, hi): their cosine distances to ``pick`` from the features,
    keys updated in rel/fill; returns the (max, index) of the new fill keys there."""
    pick_ptr = visual_ptr + b * s_vb + pick.to(tl.int64) * s_vn
    inv_pick = _pick_inverse_norm(part_ptr, b, pick, N, n_splits)
    best = tl.full([], float("-inf"), tl.float32)
    next_pick = tl.full([], 0, tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        inside = offs < hi
        rows_ptr = visual_ptr + b * s_vb + offs.to(tl.int64)[:, None] * s_vn
        dots = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            in_d = ds < D
            # the chosen row is scaled first, so a finite-norm token's dot cannot overflow
            u = tl.load(pick_ptr + ds, mask=in_d, other=0.0).to(tl.float32) * inv_pick
            v = tl.load(rows_ptr + ds[None, :], mask=inside[:, None] & in_d[None, :],
                        other=0.0).to(tl.float32)
            dots += tl.sum(v * u[None, :], axis=1)
        inv = tl.load(inv_ptr + b * N + offs, mask=inside, other=0.0)
        rel = tl.load(rel_ptr + b * N + offs, mask=inside, other=float("-inf"))
        fill = tl.load(fill_ptr + b * N + offs, mask=inside, other=float("-inf"))
        rel, fill = _update(rel, fill, offs, pick, 1.0 - dots * inv)
        tl.store(rel_ptr + b * N + offs, rel, mask=inside)
        tl.store(fill_ptr + b * N + offs, fill, mask=inside)
        best, next_pick = _running_argmax(fill, offs, best, next_pick)
    return best, next_pick


@triton.jit
def _lower_by_core(visual_ptr, inv_ptr, fill_ptr, b, lo, hi, N, D, core, valid, s_vb, s_vn,
                   INTERPRETED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fill keys of tokens [lo, hi) lowered by their distances to the ``core`` picks (where
    ``valid``), which are marked chosen: raw dot products on tensor cores (float32 accumulation,
    exact ``ieee`` products for float32), distances ``1 - G * inv_pick * inv`` as in Gram mode."""
    core_ptr = visual_ptr + b * s_vb + core.to(tl.int64)[:, None] * s_vn
    inv_core = tl.load(inv_ptr + b * N + core, mask=valid, other=0.0)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        inside = offs < hi
        rows_ptr = visual_ptr + b * s_vb + offs.to(tl.int64)[:, None] * s_vn
        gram = tl.zeros([BLOCK_N, core.shape[0]], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            in_d = ds < D
            v = tl.load(rows_ptr + ds[None, :], mask=inside[:, None] & in_d[None, :], other=0.0)
            u = tl.load(core_ptr + ds[None, :], mask=valid[:, None] & in_d[None, :], other=0.0)
            if INTERPRETED:  # numpy's matmul rounds a row differently at another position in
                # the tile, so duplicate tokens would not tie: sum each product row alike
                gram += tl.sum(v.to(tl.float32)[:, None, :] * u.to(tl.float32)[None, :, :], axis=2)
            else:  # tensor cores: every row of the tile is summed in the same order
                gram = tl.dot(v, tl.trans(u), gram, input_precision="ieee")
        inv = tl.load(inv_ptr + b * N + offs, mask=inside, other=0.0)
        fill = tl.load(fill_ptr + b * N + offs, mask=inside, other=float("-inf"))
        distance = tl.trans(1.0 - gram * inv_core[None, :] * inv[:, None])
        tl.store(fill_ptr + b * N + offs, _lower_by_rows(fill, offs, core, valid, distance),
                 mask=inside)


@triton.jit
def _select_stream_kernel(visual_ptr, part_ptr, psq_ptr, counts_ptr, inv_ptr, rel_ptr,
                          fill_ptr, nearest_ptr, sync_ptr, out_ptr, N, D, keep, n_core,
                          n_splits, n_groups, n_sync, P, slice_len, s_vb, s_vn,
                          NEED_NEAREST: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, CORE: tl.constexpr, CORE_K: tl.constexpr,
                          INTERPRETED: tl.constexpr):
    """Launch 2 without a Gram scratch, grid (P, B): program ``part`` of image ``b`` owns the
    tokens [part * slice_len, (part + 1) * slice_len); each fill step it computes the chosen
    token's cosines to them from the features, updates their keys in rel/fill [B, N] and joins
    the image's grid-wide argmax (``_grid_argmax``); relevance-core picks only join the argmax,
    and their distances come CORE picks per pass over the features. P > 1 needs all B * P programs resident at
    once: the host launches it as a cooperative grid. A failed image's row is all -1 and its
    failure flag (sync word 1) is set; no index outside [0, N) is ever read or written."""
    part = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    lo = part * slice_len
    hi = tl.minimum(lo + slice_len, N)
    sync = sync_ptr + b * n_sync
    count, n_core = _image_core(counts_ptr, b, n_core)
    ok = tl.full([], 1, tl.int1)
    best = tl.full([], float("-inf"), tl.float32)
    pick = tl.full([], 0, tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        inside = offs < hi
        inv, rel, fill = _token_keys(part_ptr, psq_ptr, fill_ptr, b, offs, inside, N, n_splits,
                                     count)
        tl.store(inv_ptr + b * N + offs, inv, mask=inside)
        tl.store(rel_ptr + b * N + offs, rel, mask=inside)
        tl.store(fill_ptr + b * N + offs, fill, mask=inside)
        key = _first_key(rel, fill, nearest_ptr, b, offs, inside, N, n_groups, n_core,
                         NEED_NEAREST)
        best, pick = _running_argmax(key, offs, best, pick)
    tl.debug_barrier()  # the steps read the keys stored above
    pick, ok = _grid_argmax(sync, best, pick, P, 0, ok, N, INTERPRETED)
    slots = tl.arange(0, CORE)
    core = tl.zeros([CORE], tl.int32)
    for step in range(0, keep):
        if step < n_core:
            # a core pick needs no distances: park it; CORE at a time lower the fill keys in one
            # pass over the features (a [BLOCK_N, D] x [D, CORE] product per token block)
            core = tl.where(slots == step % CORE, pick, core)
            if (pick >= lo) & (pick < hi):
                tl.store(rel_ptr + b * N + pick, float("-inf"))
            if (step % CORE == CORE - 1) | (step == n_core - 1):
                _lower_by_core(visual_ptr, inv_ptr, fill_ptr, b, lo, hi, N, D, core,
                               slots <= step % CORE, s_vb, s_vn, INTERPRETED, BLOCK_N, CORE_K)
            tl.debug_barrier()  # the argmax below reads the keys stored above
            best, next_pick = _slice_argmax(rel_ptr if step + 1 < n_core else fill_ptr, b, lo,
                                            hi, N, BLOCK_N)
        else:
            best, next_pick = _fill_step(visual_ptr, part_ptr, inv_ptr, rel_ptr, fill_ptr, b, lo,
                                         hi, N, D, n_splits, pick, s_vb, s_vn, BLOCK_N, BLOCK_D)
        tl.debug_barrier()  # the next step reads the keys this one stored
        pick, ok = _grid_argmax(sync, best, next_pick, P, step + 1, ok, N, INTERPRETED)
    # a last phase: every program's keys are stored before program 0 reads them all
    tl.debug_barrier()
    _, ok = _grid_argmax(sync, best, pick, P, keep + 1, ok, N, INTERPRETED)
    if part == 0:
        ok = ok & (tl.atomic_add(sync + 1, 0, sem="acquire", scope="gpu") == 0)
        good = ok.to(tl.int32)  # masks use `x * 0 + good`: the interpreter broadcasts a
        # scalar int1 in `&` to int32 masks, which its store rejects
        written = tl.full([], 0, tl.int32)
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            inside = offs < N
            fill = tl.load(fill_ptr + b * N + offs, mask=inside, other=0.0, volatile=True)
            chosen = inside & (fill == float("-inf"))
            position = written + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + b * keep + position, offs.to(tl.int64),
                     mask=chosen & (position < keep) & (position * 0 + good != 0))
            written += tl.sum(chosen.to(tl.int32), axis=0)
        for k0 in range(0, keep, BLOCK_N):  # a failed row is all -1, never partly written
            ks = k0 + tl.arange(0, BLOCK_N)
            tl.store(out_ptr + b * keep + ks, tl.full([BLOCK_N], -1, tl.int64),
                     mask=(ks < keep) & (ks * 0 + good == 0))
        if ok == 0:
            tl.atomic_xchg(sync + 1, 1, sem="relaxed", scope="gpu")  # the host's failure check
