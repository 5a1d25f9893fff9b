"""The baselines the fused kernels are benchmarked against (bench only, not in the package).

Both implement ZSPAPrune's rule exactly (same picks as ``zspaprune_ops.reference``), so the
benchmark can check every output before timing it. They take checked, batched inputs: visual
[B, N, D] and prompt [B, T, D] (float16/bfloat16/float32), keep, relevance_ratio, optional bool
masks prompt_mask [B, T] and visual_mask [B, N]; they return int64 [B, keep], ascending.
"""
import torch

from zspaprune_ops.reference.naive import (_fill_choice, _has_prompt, _mean_prompt, _unit_rows,
                                            select_batched)
from zspaprune_ops.rule import DEMOTED, PADDING, core_size, may_start_with_divprune

COMPILE_MAX_KEEP = {"cuda": 64, "cpu": 8}
"""Default largest ``keep`` for ``reference_compiled`` by device type: dynamo unrolls the
reference's Python loop over the keep steps, so compile time grows with keep (on this project's
2-core CPU: 6 s at keep=4, 8 s at keep=8, 53 s at keep=64, cold cache)."""

DIVPRUNE_MAX_BYTES = 4 << 30
"""Default bound on ``divprune_bytes``: larger shapes skip ``divprune_loop`` instead of running
out of memory (B=1, N=32768 needs 2 x 4 GiB of N×N matrices)."""


def reference_compiled():
    """A fresh ``torch.compile`` of the reference's ``select_batched`` (inductor, static shapes).

    Resets dynamo first, so that each benchmark shape compiles once and never hits the
    recompile limit, where torch.compile would silently fall back to eager.
    """
    torch._dynamo.reset()
    return torch.compile(select_batched, dynamic=False)


def matmul_floor(visual, keep):
    """The N×keep matrix-product floor: a callable multiplying every token by ``keep`` columns,
    [B, N, D] × [B, D, keep] in float32 (float16 / bfloat16 converted first, counted: this CPU
    has no bfloat16 instructions, and its bfloat16 product is ~10× slower than float32's). This
    is the arithmetic a farthest-point fill needs (every token's dot with every pick) done in one
    blocked product, with no selection; its output is not a selection."""
    columns = torch.randn(visual.shape[0], visual.shape[2], keep, device=visual.device)
    return lambda: torch.bmm(visual.float(), columns)


def divprune_bytes(B: int, N: int, keep: int) -> int:
    """Float32 scratch of ``divprune_loop``: the N×N distances and a masked copy of them, plus the
    chosen rows gathered at the last step."""
    return 4 * (2 * B * N * N + B * keep * N)


def divprune_loop(visual, prompt, keep, relevance_ratio, prompt_mask=None, visual_mask=None):
    """DivPrune-style selection: the full [B, N, N] cosine-distance matrix, then one step of torch
    ops per kept token, each taking the min over the matrix rows of all tokens chosen so far
    (as DivPrune's published loop does), with ZSPAPrune's relevance core in front."""
    B, N, _ = visual.shape
    v_hat, scorable = _unit_rows(visual.float())
    real = visual_mask if visual_mask is not None else torch.ones_like(scorable)
    distance = 1.0 - v_hat @ v_hat.transpose(1, 2)
    distance.masked_fill_(distance.isnan(), float("inf"))  # a NaN distance is ignored, like fmin

    scores = (v_hat @ _mean_prompt(prompt, prompt_mask)[..., None]).squeeze(-1)
    scores = torch.where(scorable & ~scores.isnan(), scores, DEMOTED)  # as the reference
    scores = torch.where(real, scores, PADDING)
    by_relevance = scores.sort(dim=1, descending=True, stable=True).indices
    n_core = torch.where(_has_prompt(prompt, prompt_mask), core_size(keep, relevance_ratio), 0)

    if may_start_with_divprune(prompt.shape[1], keep, relevance_ratio, prompt_mask is not None):
        others = real[:, None, :] & ~torch.eye(N, dtype=torch.bool, device=visual.device)
        nearest_other = distance.masked_fill(~others, float("inf")).amin(dim=2)
        first_pick = _fill_choice(nearest_other, real, scorable, torch.zeros_like(real))
        first_pick = torch.where(n_core == 0, first_pick, by_relevance[:, 0])
    else:
        first_pick = by_relevance[:, 0]

    rows = torch.arange(B, device=visual.device)
    chosen = torch.zeros_like(real)
    picks = torch.empty(B, keep, dtype=torch.int64, device=visual.device)
    for step in range(keep):
        if step == 0:
            pick = first_pick
        else:
            chosen_rows = distance.gather(1, picks[:, :step, None].expand(B, step, N))
            pick = _fill_choice(chosen_rows.amin(dim=1), real, scorable, chosen)
            pick = torch.where(step < n_core, by_relevance[:, step], pick)
        picks[:, step] = pick
        chosen[rows, pick] = True
    return picks.sort(dim=1).values
