"""The fast selection off CUDA: ZSPAPrune's rule in blocked matrix products, pure PyTorch.

The reference (``reference/naive.py``) makes one pick per step, each step a pass over all N×D
features. Here images run one after another and distances come from matrix products of all
of an image's tokens against blocks of picks:

- the relevance core needs no distances between its picks: they are the top of one sort, and
  their distances reach the fill keys in one ``[N, D] × [D, core]`` product;
- the fill runs in passes. The ``CANDIDATES`` best unchosen tokens by fill key are candidates and
  the next key (with its index) is a **bound** on every other token's key, since keys only fall.
  Picks are confirmed one at a time among the candidates, exactly as the rule makes them, while
  the best candidate beats the bound; the candidates' keys are lowered by each confirmed pick
  through a ``[C, D] × [D, C]`` product of their features (the kernels' exact multi-pick bound,
  ``kernels/README.md``). One ``[N, D] × [D, m]`` product then lowers every token's key by the
  pass's ``m`` confirmed picks.

BLAS rounds the dot products of two equal rows differently at different positions (seen with
torch 2.13's CPU matrix products and matrix-vector products), so bitwise-equal tokens are found first and every per-token value is
read from the lowest-indexed copy: equal tokens then tie exactly and go to the lower index.

Extra memory: one float32 copy of one image's features (float16 / bfloat16 input, converted
and normalized into a buffer reused by every image; float32 input is multiplied as it is, and
copied only for an image that starts with DivPrune's pick), O(N) keys and ``[N, COLUMN_BLOCK]``
products. The duplicate check copies only the rows whose sampled features collide, in their own
dtype.
"""
import torch

from zspaprune_ops.reference.naive import _fill_choice, _nearest_other_distance
from zspaprune_ops.rule import DEMOTED, NORM_EPS, PADDING, core_size

CANDIDATES = 32
"""Candidates per fill pass (the kernels take 16: ``bench/multipick_sim.py``)."""
COLUMN_BLOCK = 256
"""Picks whose distances one product computes: bounds the [N, COLUMN_BLOCK] product."""
ROW_BLOCK = 256
"""Prompt rows summed, and feature rows' norms taken, at once (torch's norm copies its input)."""
SIGNATURE_COLUMNS = 16
"""Features per row compared exactly to find candidate duplicate rows."""
_SIGNATURE_WEIGHTS = torch.randint(1, 1 << 16, (SIGNATURE_COLUMNS,),
                                   generator=torch.Generator().manual_seed(0))


def select_batched(visual, prompt, keep, relevance_ratio, prompt_mask=None, visual_mask=None):
    """The reference's ``select_batched`` contract on checked inputs: visual [B, N, D], prompt
    [B, T, D] (float16 / bfloat16 / float32), bool masks [B, T] / [B, N] or None -> int64
    [B, keep], each row ascending."""
    B, N, D = visual.shape
    n_core = core_size(keep, relevance_ratio)
    # float32 features are multiplied as they are; others go through one reused float32 buffer
    buffer = None if visual.dtype == torch.float32 else visual.new_empty(N, D, dtype=torch.float32)
    kept = torch.empty(B, keep, dtype=torch.int64, device=visual.device)
    for b in range(B):
        kept[b] = select_one(visual[b], prompt[b], keep, n_core,
                             None if prompt_mask is None else prompt_mask[b],
                             None if visual_mask is None else visual_mask[b], buffer)
    return kept


def select_one(visual, prompt, keep, n_core, prompt_mask=None, visual_mask=None, buffer=None):
    """One image: visual [N, D], prompt [T, D], masks [T] / [N] or None -> int64 [keep]
    ascending. ``n_core`` is the core size for an image with a real prompt token; ``buffer``
    is float32 [N, D] scratch, needed unless visual is float32."""
    N = visual.shape[0]
    copies = first_copies(visual)
    rows = _Rows(visual, buffer, copies)
    real = visual_mask if visual_mask is not None else torch.ones_like(rows.scorable)
    has_prompt = bool(prompt_mask.any()) if prompt_mask is not None else prompt.shape[0] > 0
    picks = _core(rows, real, _prompt_direction(prompt, prompt_mask), copies,
                  n_core) if has_prompt and n_core else []
    if not picks:  # an empty core starts with DivPrune's pick
        nearest = _nearest_other_distance(rows.units()[None], real[None])[0]
        picks = [int(_fill_choice(_canonical(nearest, copies)[None], real[None],
                                  rows.scorable[None], torch.zeros_like(real[None]))[0])]
    fill_real = rows.scorable & real
    sentinel = torch.where(real, DEMOTED, PADDING)
    chosen = torch.zeros_like(real)
    min_distance = torch.full((N,), float("inf"), device=visual.device)
    new = picks
    while True:
        chosen[new] = True
        if len(picks) == keep:
            break
        min_distance = _canonical(rows.lower(min_distance, new), copies)
        key = torch.where(fill_real, min_distance, sentinel).masked_fill_(chosen, float("-inf"))
        new = _confirm(key, rows, fill_real, copies, keep - len(picks), N - len(picks))
        picks = picks + new
    return torch.tensor(sorted(picks), dtype=torch.int64, device=visual.device)


class _Rows:
    """One image's features for products. ``features`` [N, D] float32 divided row-wise by
    ``divisor`` are the unit rows x / max(||x||, eps) of the rule: float32 input is used as it
    is (divisor = the clamped norms, applied to products), other dtypes are converted and
    normalized into ``buffer`` (divisor None), exactly as the reference computes its unit rows.
    """

    def __init__(self, x, buffer, copies):
        if x.dtype == torch.float32:
            self.features, norm = x, _canonical(_norms(x), copies)
            self.divisor = norm.clamp_min(NORM_EPS)
        else:
            self.features = buffer.copy_(x)
            norm = _canonical(_norms(buffer), copies)
            self.divisor = None
            buffer.div_(norm.clamp_min(NORM_EPS)[:, None])
        self.scorable = norm.isfinite()

    def units(self, index=None):
        """Unit rows [len(index), D] (all N when index is None: a float32 copy if x was)."""
        rows = self.features if index is None else self.features[index]
        if self.divisor is None:
            return rows
        return rows / (self.divisor if index is None else self.divisor[index])[:, None]

    def cosines(self, units):
        """[N] cosine of every row to ``units`` [D] (one product)."""
        dots = self.features @ units
        return dots if self.divisor is None else dots / self.divisor

    def lower(self, min_distance, picks):
        """min_distance [N] lowered by the cosine distances to ``picks`` (NaN ones ignored)."""
        for start in range(0, len(picks), COLUMN_BLOCK):
            dots = self.features @ self.units(picks[start:start + COLUMN_BLOCK]).T  # [N, m]
            nearest = dots.masked_fill_(dots.isnan(), float("-inf")).amax(dim=1)
            if self.divisor is not None:  # x·u / ||x||: dividing by a positive keeps the max
                nearest = nearest / self.divisor
            # 1 - max(cos) = min(1 - cos) exactly: the subtraction rounds monotonically
            min_distance = torch.fmin(min_distance, 1.0 - nearest)
        return min_distance


def first_copies(x):
    """int64 [N]: for each row of x [N, D] the lowest index of a bitwise-equal row; None when
    all rows differ. Rows are hashed exactly (integer arithmetic) on a few sampled features;
    only rows whose hashes collide are compared in full."""
    N, D = x.shape
    bits = x.view(torch.int32 if x.element_size() == 4 else torch.int16)
    columns = torch.arange(0, D, max(1, D // SIGNATURE_COLUMNS), device=x.device)
    columns = columns[:SIGNATURE_COLUMNS]
    weights = _SIGNATURE_WEIGHTS[:len(columns)].to(x.device)
    signature = (bits[:, columns].long() * weights).sum(1)  # < 2^51: exact, order-free
    ordered, order = torch.sort(signature, stable=True)
    same = ordered[1:] == ordered[:-1]
    if not bool(same.any()):
        return None
    suspect = torch.zeros(N, dtype=torch.bool, device=x.device)
    suspect[order[1:][same]] = True
    suspect[order[:-1][same]] = True
    rows = suspect.nonzero().squeeze(1)
    _, group = torch.unique(bits[rows], dim=0, return_inverse=True)
    first = torch.full((N,), N, device=x.device).scatter_reduce(0, group, rows, "amin")
    copies = torch.arange(N, device=x.device)
    copies[rows] = first[group]
    return copies


def _canonical(values, copies):
    """values [N] read from each token's lowest-indexed copy."""
    return values if copies is None else values[copies]


def _norms(x):
    """float32 [N]: the norm of each row of x [N, D], ROW_BLOCK rows at a time."""
    return torch.cat([x[start:start + ROW_BLOCK].norm(dim=-1)
                      for start in range(0, x.shape[0], ROW_BLOCK)])


def _prompt_direction(prompt, prompt_mask):
    """float32 [D]: the mean of the real prompt rows of prompt [T, D], normalized."""
    total = torch.zeros(prompt.shape[1], device=prompt.device)
    for start in range(0, prompt.shape[0], ROW_BLOCK):
        block = prompt[start:start + ROW_BLOCK].float()
        if prompt_mask is not None:
            block = torch.where(prompt_mask[start:start + ROW_BLOCK, None], block, 0.0)
        total += block.sum(0)
    count = prompt.shape[0] if prompt_mask is None else int(prompt_mask.sum())
    mean = total / max(count, 1)
    return mean / mean.norm().clamp_min(NORM_EPS)


def _core(rows, real, direction, copies, n_core):
    """The relevance core: the n_core best tokens by cosine to ``direction``, lower index on
    ties, unscorable (or NaN-relevance) tokens after scorable ones and padded ones last."""
    relevance = _canonical(rows.cosines(direction), copies)
    relevance = torch.where(rows.scorable & ~relevance.isnan(), relevance, DEMOTED)
    relevance = torch.where(real, relevance, PADDING)
    return torch.sort(relevance, descending=True, stable=True).indices[:n_core].tolist()


def _confirm(key, rows, fill_real, copies, need, free):
    """The next picks of the fill (at least one, at most ``need``), exactly the rule's.

    key [N] holds every token's fill key (-inf once chosen); ``free`` tokens are unchosen.
    """
    count = min(CANDIDATES, free)
    top = torch.sort(key, descending=True, stable=True).indices[:count + 1]
    index, keys = top.tolist(), key[top].tolist()
    if need == 1 or count == 1:
        return index[:1]
    bound = (keys[count], -index[count]) if free > count else None
    cand, keys = index[:count], keys[:count]
    units = rows.units(cand)
    distance = (1.0 - units @ units.T).tolist()  # [C, C]
    # equal tokens must see equal distances: read rows from the first candidate of each copy
    row = list(range(count))
    if copies is not None:
        first = {}
        row = [first.setdefault(c, j) for j, c in enumerate(copies[cand].tolist())]
    lowers = fill_real[cand].tolist()
    active, picks = list(range(count)), []
    while active and len(picks) < need:
        best = max(active, key=lambda j: (keys[j], -cand[j]))
        if picks and bound is not None and (keys[best], -cand[best]) <= bound:
            break  # a token outside the candidates may beat it
        picks.append(cand[best])
        active.remove(best)
        for j in active:
            d = distance[row[j]][best]
            if lowers[j] and d < keys[j]:  # False for NaN: ignored, as fmin does
                keys[j] = d
    return picks
