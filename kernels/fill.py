"""Launch 2 of the fused selection: core top-k and farthest-point fill.

Keys (float32, larger = taken first): relevance for the core, the running minimum cosine
distance for the fill, the rule's sentinels DEMOTED / PADDING for unscorable / padded tokens and
-inf once chosen. Ties go to the lower index everywhere (``tl.argmax`` keeps the first maximum;
packed (key, index) values order equal keys by the lower index). The chosen tokens end with
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
_POLL_NS = tl.constexpr(100_000)
"""What one poll of a barrier counts as under Triton's interpreter (no GPU timer there)."""
_LOW = tl.constexpr(0xFFFFFFFF)
_NONE = tl.constexpr(-(1 << 63))
"""A packed key below every real one: an empty list slot."""
_FAILED = tl.constexpr(1 << 40)
"""Bit of an image's sync word set when a program gave up waiting (arrivals stay below it)."""
_ARRIVALS = tl.constexpr((1 << 40) - 1)
_LISTS_AT = tl.constexpr(16)
"""First int64 word of an image's lists buffers: the barrier word has its 128-byte line alone."""


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


@triton.jit(do_not_specialize=["N", "keep", "n_core", "n_splits", "n_groups"],
            do_not_specialize_on_alignment=["out_ptr"])
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
    tl.store(out_ptr + b * keep + position, offs.to(tl.int64), mask=chosen & (position < keep))


@triton.jit
def _pack(key, index):
    """(key, index) -> int64 whose signed order is the key's float order, then the lower index
    (keys are never NaN; -0.0 is made +0.0 so that it ties with +0.0 as floats do)."""
    bits = tl.where(key == 0.0, 0.0, key).to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (index.to(tl.int64) ^ _LOW)  # low word: ~index


@triton.jit
def _unpack(packed):
    """``_pack``'s inverse: (key float32, index int32)."""
    ordered = (packed >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), ((packed & _LOW) ^ _LOW).to(tl.int32)


@triton.jit
def _top_merge(top, packed, INTERPRETED: tl.constexpr):
    """The ``top.shape[0]`` largest of the list ``top`` and the values ``packed`` (at least as
    many, a power of two), in any order (packed values are distinct but for ``_NONE``)."""
    k: tl.constexpr = top.shape[0]
    if INTERPRETED:  # the interpreter runs topk's bitonic network element by element: rank
        merged = tl.maximum(_ranked(top, top, packed), _ranked(packed, top, packed))
    else:
        merged = tl.topk(tl.reshape(tl.join(top, tl.topk(packed, k)), [2 * k]), k)
    return merged


@triton.jit
def _ranked(x, a, b):
    """The values ``x`` (of ``a`` or ``b``) at their rank among ``a`` and ``b`` in ``a.shape[0]``
    slots (``_NONE`` where no value ranks there)."""
    rank = (tl.sum((a[None, :] > x[:, None]).to(tl.int32), axis=1)
            + tl.sum((b[None, :] > x[:, None]).to(tl.int32), axis=1))
    slots = tl.arange(0, a.shape[0])
    return tl.max(tl.where(rank[:, None] == slots[None, :], x[:, None], _NONE), axis=0)


@triton.jit
def _grid_wait(sync_ptr, P, phase, ok, wait_us, INTERPRETED: tl.constexpr):
    """Arrive at barrier ``phase`` of the image's P programs and wait for all of them.

    sync_ptr: the image's barrier word: arrivals in the low bits, ``_FAILED`` once the image
    failed. The arrival releases this program's earlier stores (call ``tl.debug_barrier()``
    first), the polls acquire the others'. Returns whether every program arrived before the
    image failed; all P programs agree on it: a program that gives up (``ok`` already False, or
    a wait over ``wait_us`` microseconds) sets ``_FAILED`` only while the barrier is still short
    (a compare-and-swap against the word it last read), so a last arrival that lands as the wait
    times out passes the barrier for everyone, and once ``_FAILED`` is set no program passes
    it. With P = 1 nothing waits. Triton's interpreter has no GPU timer: there each poll counts
    as ``_POLL_NS``."""
    target = P * (phase + 1)
    wait_ns = wait_us.to(tl.int64) * 1000
    if ok == 0:  # failed before this barrier: flag it before arriving, so nobody passes it
        tl.atomic_or(sync_ptr, _FAILED, sem="release", scope="gpu")
    word = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") + 1
    waited = tl.zeros([], tl.int64)
    last = tl.zeros([], tl.int64)
    while ((word & _ARRIVALS) < target) & ((word & _FAILED) == 0):
        if waited >= wait_ns:  # give up, unless the last arrival landed since `word` was read
            seen = tl.atomic_cas(sync_ptr, word, word | _FAILED, sem="acq_rel", scope="gpu")
            word = tl.where(seen == word, word | _FAILED, seen)
        else:
            word = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
            if INTERPRETED:
                waited += _POLL_NS
            else:
                now = globaltimer()
                waited += tl.where(last == 0, 0, now - last)
                last = now
    return ((word & _ARRIVALS) >= target) & ((word & _FAILED) == 0)


@triton.jit
def _candidates(lists_ptr, P, CAND: tl.constexpr, CHUNK: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """The image's candidates and their bound, from its P programs' lists [P, 2 * CAND] (each
    the packed fill or relevance keys of its slice's 2 * CAND best tokens): the CAND largest
    packed keys of the image [CAND] (any order) and the largest packed key of any other token.
    Every program merges all lists itself (CHUNK lists per load): no second barrier."""
    top = tl.full([2 * CAND], _NONE, tl.int64)
    words = tl.arange(0, CHUNK * 2 * CAND)
    for w0 in range(0, P * 2 * CAND, CHUNK * 2 * CAND):
        w = w0 + words
        top = _top_merge(top, tl.load(lists_ptr + w, mask=w < P * 2 * CAND, other=_NONE,
                                      volatile=True), INTERPRETED)
    cand = _top_merge(tl.full([CAND], _NONE, tl.int64), top, INTERPRETED)
    # a token outside every list is below the 2 * CAND of its own list, of which at most CAND
    # are candidates: the largest non-candidate listed bounds it
    bound = tl.max(tl.where(top < tl.min(cand, axis=0), top, _NONE), axis=0)
    return cand, bound


@triton.jit
def _distances(visual_ptr, inv_ptr, b, rows, inside, N, D, cand, valid, s_vb, s_vn,
               INTERPRETED: tl.constexpr, BLOCK_K: tl.constexpr):
    """Cosine distances [R, CAND] of tokens ``rows`` [R] (where ``inside``) to tokens ``cand``
    [CAND] (where ``valid``): raw dot products with float32 accumulation (16-bit features on
    tensor cores, float32 as exact products on CUDA cores), then ``1 - G * inv_cand * inv_row``.
    A pair gets the same bits whatever R is and wherever it sits in the tile."""
    rows_ptr = visual_ptr + b * s_vb + rows.to(tl.int64)[:, None] * s_vn
    cand_ptr = visual_ptr + b * s_vb + cand.to(tl.int64)[:, None] * s_vn
    gram = tl.zeros([rows.shape[0], cand.shape[0]], tl.float32)
    for d0 in range(0, D, BLOCK_K):
        ds = d0 + tl.arange(0, BLOCK_K)
        in_d = ds < D
        v = tl.load(rows_ptr + ds[None, :], mask=inside[:, None] & in_d[None, :], other=0.0)
        u = tl.load(cand_ptr + ds[None, :], mask=valid[:, None] & in_d[None, :], other=0.0)
        if INTERPRETED or v.dtype == tl.float32:  # CUDA cores (float32 has no exact tensor-core
            # product), and the interpreter, whose numpy matmul rounds a row differently at
            # another position in the tile (duplicate tokens would not tie)
            gram += tl.sum(v.to(tl.float32)[:, None, :] * u.to(tl.float32)[None, :, :], axis=2)
        else:  # tensor cores: every element of the tile is summed in the same order
            gram = tl.dot(v, tl.trans(u), gram)
    inv_cand = tl.load(inv_ptr + b * N + cand, mask=valid, other=0.0)
    inv = tl.load(inv_ptr + b * N + rows, mask=inside, other=0.0)
    return 1.0 - gram * inv_cand[None, :] * inv[:, None]


@triton.jit
def _confirm(packed, bound, distance, limit, lower):
    """The next picks among the candidates, made one at a time exactly as the rule makes them:
    the largest (key, lower index) is a pick while it beats ``bound``, which every other token's
    key (only lowered since) stays under; then the candidates' keys are lowered by its
    distances, as the fill does (``lower``; the relevance core's keys do not move).

    packed [C]: the candidates' packed keys (``_NONE``: no candidate), bound: the largest other
    packed key, distance [C, C]: [i, j] candidate i's distance to candidate j as the slices
    compute it for token i and pick j, limit: most picks, lower: whether picks lower keys.
    Returns the picks' mask [C] and their count (>= 1 unless no candidate is valid)."""
    slots = tl.arange(0, packed.shape[0])
    key, index = _unpack(packed)
    valid = packed != _NONE
    chosen = slots < 0
    floor = _pack(tl.full([], float("-inf"), tl.float32), tl.zeros([], tl.int32))
    best = tl.max(packed, axis=0)
    count = tl.zeros([], tl.int32)
    go = (best > bound) & (best > floor) & (limit > 0)  # floor: a chosen token is no pick
    while go:
        this = packed == best
        chosen |= this
        count += 1
        column = tl.sum(tl.where(slots[None, :] == tl.sum(tl.where(this, slots, 0), axis=0),
                                 distance, 0.0), axis=1)
        column = tl.where(column == column, column, float("inf"))  # NaN: ignored, as fmin does
        column = tl.where(column < -1.0, -1.0, column)  # only -inf from overflow: keep off -inf
        key = tl.where(lower & (column < key), column, key)
        packed = tl.where(valid & ~chosen, _pack(key, index), _NONE)
        best = tl.max(packed, axis=0)
        go = (best > bound) & (best > floor) & (count < limit)
    return chosen, count


@triton.jit
def _lower_slice(visual_ptr, inv_ptr, rel_ptr, fill_ptr, b, lo, hi, N, D, cand, chosen,
                 next_core, need_distances, s_vb, s_vn, INTERPRETED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One pass over the features of tokens [lo, hi): the ``chosen`` candidates marked chosen
    (-inf in both keys) and the fill keys lowered by their distances (skipped after the last
    pick: only the marks are read then). Returns the slice's list for the next pass: the packed
    keys [2 * CAND] of its best tokens by relevance (``next_core``) or fill key."""
    top = tl.full([2 * cand.shape[0]], _NONE, tl.int64)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        inside = offs < hi
        if need_distances:
            distance = tl.trans(_distances(visual_ptr, inv_ptr, b, offs, inside, N, D, cand,
                                           chosen, s_vb, s_vn, INTERPRETED, BLOCK_K))
        else:
            distance = tl.full([cand.shape[0], BLOCK_N], float("inf"), tl.float32)
        fill = tl.load(fill_ptr + b * N + offs, mask=inside, other=float("-inf"))
        fill = _lower_by_rows(fill, offs, cand, chosen, distance)
        rel = tl.load(rel_ptr + b * N + offs, mask=inside, other=float("-inf"))
        rel = tl.where(fill == float("-inf"), float("-inf"), rel)  # -inf fill key: chosen
        tl.store(fill_ptr + b * N + offs, fill, mask=inside)
        tl.store(rel_ptr + b * N + offs, rel, mask=inside)
        key = tl.where(next_core, rel, fill)
        top = _top_merge(top, tl.where(inside, _pack(key, offs), _NONE), INTERPRETED)
    return top


@triton.jit(do_not_specialize=["N", "keep", "n_core", "n_splits", "n_groups", "n_sync", "P",
                               "slice_len", "wait_us", "s_vb"],
            do_not_specialize_on_alignment=["out_ptr"])
def _select_stream_kernel(visual_ptr, part_ptr, psq_ptr, counts_ptr, inv_ptr, rel_ptr,
                          fill_ptr, nearest_ptr, sync_ptr, out_ptr, N, D, keep, n_core,
                          n_splits, n_groups, n_sync, P, slice_len, wait_us, s_vb, s_vn,
                          NEED_NEAREST: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAND: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                          INTERPRETED: tl.constexpr):
    """Launch 2 without a Gram scratch, grid (P, B), several picks per pass over the features.

    Program ``part`` of image ``b`` owns the tokens [part * slice_len, (part + 1) * slice_len)
    and their keys in rel/fill [B, N]. A pass: every program publishes its slice's best packed
    keys, meets the others at a grid-wide barrier, merges every list into the image's CAND
    candidates and a bound on every other key (``_candidates``), confirms the next picks among
    the candidates exactly as the one-at-a-time rule makes them (``_confirm``: relevance-core
    picks need no distances; fill picks use the candidates' distances to each other), then
    lowers its slice's fill keys by the picks' distances, CAND columns of one tensor-core
    product per token block, listing its best keys for the next pass (``_lower_slice``).

    sync_ptr [B, n_sync] int64: word 0 the barrier (``_grid_wait``), from word ``_LISTS_AT``
    two lists buffers [2, P, 2 * CAND] used in turn. P > 1 needs all B * P programs resident at once: the host
    launches a cooperative grid. A failed image's row is all -1 and its sync word has
    ``_FAILED``; no index outside [0, N) is ever read or written."""
    part = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    lo = part * slice_len
    hi = tl.minimum(lo + slice_len, N)
    sync = sync_ptr + b * n_sync
    count, n_core = _image_core(counts_ptr, b, n_core)
    ok = tl.full([], 1, tl.int1)
    top = tl.full([2 * CAND], _NONE, tl.int64)
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
        top = _top_merge(top, tl.where(inside, _pack(key, offs), _NONE), INTERPRETED)
    slots = tl.arange(0, 2 * CAND)
    done = tl.zeros([], tl.int32)
    phase = tl.zeros([], tl.int32)
    while done < keep:
        lists = sync + _LISTS_AT + (phase % 2) * P * 2 * CAND  # in turn: a late reader never sees the
        tl.store(lists + part * 2 * CAND + slots, top)  # list of the pass after its own
        tl.debug_barrier()  # every key and list stored before the arrival releases them
        ok = _grid_wait(sync, P, phase, ok, wait_us, INTERPRETED)
        phase += 1
        packed, bound = _candidates(lists, P, CAND, CHUNK, INTERPRETED)
        cand = _unpack(packed)[1]
        # (tl.where: Triton's interpreter turns `scalar int1 & block int1` into int32, which its
        # loads reject as a mask)
        valid = tl.where(ok, (packed != _NONE) & (cand >= 0) & (cand < N), False)
        cand = tl.where(valid, cand, 0)
        in_core = done < n_core
        # DivPrune's first pick has its own key: after it, the candidates' keys are unknown
        limit = tl.where(in_core, tl.minimum(n_core - done, CAND),
                         tl.where((done == 0) & (n_core == 0), 1, keep - done))
        if in_core:
            distance = tl.zeros([CAND, CAND], tl.float32)
        else:
            distance = _distances(visual_ptr, inv_ptr, b, cand, valid, N, D, cand, valid,
                                  s_vb, s_vn, INTERPRETED, BLOCK_K)
        chosen, picks = _confirm(tl.where(valid, packed, _NONE), bound, distance, limit,
                                 ~in_core)
        ok = ok & (picks > 0)  # no pick only when no candidate is valid: a broken wait
        done = tl.where(ok, done + picks, keep)
        top = _lower_slice(visual_ptr, inv_ptr, rel_ptr, fill_ptr, b, lo, hi, N, D, cand,
                           chosen, done < n_core, done < keep, s_vb, s_vn, INTERPRETED,
                           BLOCK_N, BLOCK_K)
    # a last barrier: every program's keys are stored before program 0 reads them all
    tl.debug_barrier()
    ok = _grid_wait(sync, P, phase, ok, wait_us, INTERPRETED)
    if part == 0:
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
