"""ZSPAPrune written as literally as possible in float64, one sample at a time, for the tests.

``replay`` walks the rule's greedy in float64 beside a result of the code under test. At each
step it takes the float64 choice when the result kept it; otherwise the result must have kept a
genuine near-tie: a candidate of the same class whose float64 score is within ``tol`` of the
best (an exact tie with a lower index than the best is not one: ties go to the lower index).
"""
import math

import torch

SCORABLE, UNSCORABLE, PADDED = 2, 1, 0  # token classes, best first


def unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def replay(visual, prompt, keep, ratio, kept, prompt_mask=None, visual_mask=None, tol=1e-5):
    """Check ``kept`` (one sample's indices) against the rule; return the float64 pick order.

    visual [N, D], prompt [T, D] of any float dtype; masks bool [T] / [N] or None.
    Raises AssertionError on a real mismatch.
    """
    N = visual.shape[0]
    if prompt_mask is None:
        prompt_mask = torch.ones(prompt.shape[0], dtype=torch.bool)
    if visual_mask is None:
        visual_mask = torch.ones(N, dtype=torch.bool)
    kept_list = kept.tolist()
    assert len(set(kept_list)) == keep == len(kept_list), f"not {keep} distinct indices: {kept_list}"
    assert kept_list == sorted(kept_list), "indices not ascending"
    in_result = torch.zeros(N, dtype=torch.bool)
    in_result[kept] = True

    # Token classes: scorable = real with a finite float32 norm (the documented rule).
    v_hat = unit(visual.double())
    scorable = visual_mask & visual.float().norm(dim=-1).isfinite()
    fill_class = torch.where(scorable, SCORABLE, torch.where(visual_mask, UNSCORABLE, PADDED))

    # Relevance to the mean of the real prompt tokens.
    has_prompt = bool(prompt_mask.any())
    if has_prompt:
        p_hat = unit(prompt.double()[prompt_mask].mean(dim=0))
        relevance = v_hat @ p_hat
    else:
        relevance = torch.zeros(N, dtype=torch.float64)
    core_class = torch.where(relevance.isnan(), torch.where(visual_mask, UNSCORABLE, PADDED),
                             fill_class)
    n_core = math.floor(keep * ratio + 0.5) if has_prompt else 0

    chosen = torch.zeros(N, dtype=torch.bool)
    min_distance = torch.full((N,), math.inf, dtype=torch.float64)
    order = []

    def take(score, cls, what):
        free = ~chosen
        best_class = max(int(c) for c in cls[free])
        candidates = free & (cls == best_class)
        if best_class == SCORABLE:
            best = int(torch.where(candidates, score, -math.inf).argmax())  # first = lowest index
        else:
            best = int(candidates.nonzero()[0])  # unscorable or padded: lowest index
        if in_result[best]:
            return best
        near = candidates & in_result
        if best_class == SCORABLE:
            gap = score[best] - score
            near &= (gap <= tol) & ~((gap == 0) & (torch.arange(N) > best))
        else:
            near &= False
        assert near.any(), (f"{what} step {len(order)}: the rule picks {best} "
                            f"(score {float(score[best]):.9f}); the result {kept_list} "
                            "holds no near-tie of it")
        return int(torch.where(near, score, -math.inf).argmax())

    for step in range(keep):
        if step < n_core:
            pick = take(relevance, core_class, "core")
        elif step == 0:
            pick = take(nearest_other_distance(v_hat, visual_mask), fill_class, "first")
        else:
            pick = take(min_distance, fill_class, "fill")
        order.append(pick)
        chosen[pick] = True
        distance = 1.0 - v_hat @ v_hat[pick]
        min_distance = torch.where(distance.isnan(), min_distance,
                                   torch.minimum(min_distance, distance))
    assert sorted(order) == kept_list
    return order


def nearest_other_distance(v_hat, visual_mask):
    """[N] float64: each token's cosine distance to its nearest other real token (inf if none)."""
    distance = 1.0 - v_hat @ v_hat.T
    others = visual_mask[None, :] & ~torch.eye(len(v_hat), dtype=torch.bool)
    distance = torch.where(others & ~distance.isnan(), distance, math.inf)
    return distance.min(dim=1).values
