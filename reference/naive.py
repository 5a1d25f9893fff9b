"""ZSPAPrune's selection rule in plain PyTorch: the reference the fused kernels are tested against.

Vectorized over the batch; the only Python loops run over the ``keep`` selection steps and over
row chunks of the DivPrune first pick. Extra memory: the float32 unit rows of the whole batch
(B·N·D·4 bytes; float16 / bfloat16 input is first converted to float32, two such copies in all)
plus O(B·N); no N×N matrix. Each step is a pass over all the features: this is the readable
form, not the fast one (``zspaprune_ops.blocked`` runs off CUDA, the Triton kernels on CUDA).
"""
from typing import Optional

import torch

from zspaprune_ops._validate import check_inputs, check_real_counts
from zspaprune_ops.rule import (DEMOTED, NORM_EPS, PADDING, core_size,
                                 may_start_with_divprune)

_CHUNK_ELEMENTS = 1 << 22  # similarity entries materialized at once by the DivPrune first pick


def select(visual: torch.Tensor, prompt: torch.Tensor, keep: int, relevance_ratio: float = 0.5,
           *, prompt_mask: Optional[torch.Tensor] = None,
           visual_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Choose ``keep`` visual tokens per image: relevance core, then farthest-point fill.

    Args:
        visual: [B, N, D] (or [N, D]) projected visual tokens; float16, bfloat16 or float32.
        prompt: [B, T, D] (or [T, D]) prompt token embeddings; any of the same dtypes.
        keep: tokens to keep per image, 1 <= keep <= real tokens of every row.
        relevance_ratio: share of ``keep`` chosen by relevance, in [0, 1].
        prompt_mask: bool [B, T], True = real prompt token (default: all real).
        visual_mask: bool [B, N], True = real visual token (default: all real).
    Returns:
        int64 [B, keep] (or [keep]) token indices, ascending in each row.
    """
    batch = check_inputs(visual, prompt, keep, relevance_ratio, prompt_mask, visual_mask)
    check_real_counts(batch.visual_mask, keep)
    kept = select_batched(batch.visual, batch.prompt, keep, relevance_ratio,
                          batch.prompt_mask, batch.visual_mask)
    return kept[0] if batch.unbatched else kept


def select_batched(visual, prompt, keep, relevance_ratio, prompt_mask=None, visual_mask=None):
    """``select`` on already-checked batched inputs (what the op's dispatch calls)."""
    B, N, _ = visual.shape
    v_hat, scorable = _unit_rows(visual.float())
    real = visual_mask if visual_mask is not None else torch.ones_like(scorable)
    has_prompt = _has_prompt(prompt, prompt_mask)

    # 1. Relevance core: the top n_core tokens by cosine to the mean prompt, lower index on ties.
    relevance = torch.einsum("bnd,bd->bn", v_hat, _mean_prompt(prompt, prompt_mask))
    relevance = torch.where(scorable & ~relevance.isnan(), relevance, DEMOTED)
    relevance = torch.where(real, relevance, PADDING)
    by_relevance = torch.sort(relevance, dim=1, descending=True, stable=True).indices
    n_core = torch.where(has_prompt, core_size(keep, relevance_ratio), 0)  # [B]

    # 2. Diversity fill: farthest point from the chosen set, lower index on ties. An empty core
    # starts with DivPrune's first pick: the token farthest from its nearest other token.
    needs_first_pick = may_start_with_divprune(prompt.shape[1], keep, relevance_ratio,
                                               prompt_mask is not None)
    if needs_first_pick:
        first_pick = _fill_choice(_nearest_other_distance(v_hat, real), real, scorable,
                                  torch.zeros_like(real))
    rows = torch.arange(B, device=visual.device)
    chosen = torch.zeros_like(real)
    min_distance = torch.full((B, N), float("inf"), device=visual.device)
    picks = torch.empty(B, keep, dtype=torch.int64, device=visual.device)
    for step in range(keep):
        pick = _fill_choice(min_distance, real, scorable, chosen)
        if step == 0 and needs_first_pick:
            pick = torch.where(n_core == 0, first_pick, pick)
        pick = torch.where(step < n_core, by_relevance[:, step], pick)
        picks[:, step] = pick
        chosen[rows, pick] = True
        distance = 1.0 - torch.einsum("bnd,bd->bn", v_hat, v_hat[rows, pick])
        min_distance = torch.fmin(min_distance, distance)  # fmin: a NaN distance is ignored
    return picks.sort(dim=1).values


def _unit_rows(x):
    """x / max(||x||, eps) per row, and whether that norm is finite (the token is scorable)."""
    norm = x.norm(dim=-1, keepdim=True)
    return x / norm.clamp_min(NORM_EPS), norm.squeeze(-1).isfinite()


def _has_prompt(prompt, prompt_mask):
    if prompt_mask is None:
        return torch.full((prompt.shape[0],), prompt.shape[1] > 0, device=prompt.device)
    return prompt_mask.any(dim=1)


def _mean_prompt(prompt, prompt_mask):
    """Mean of the real prompt embeddings (float32), normalized: [B, D]."""
    p = prompt.float()
    if prompt_mask is not None:
        p = torch.where(prompt_mask[..., None], p, 0.0)
        count = prompt_mask.sum(dim=1, keepdim=True)
    else:
        count = torch.full((p.shape[0], 1), p.shape[1], device=p.device)
    mean = p.sum(dim=1) / count.clamp_min(1)
    return mean / mean.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _fill_choice(distance, real, scorable, chosen):
    """argmax of the fill key: distance for scorable real tokens, then sentinels; [B] int64."""
    key = torch.where(scorable, distance, DEMOTED)
    key = torch.where(real, key, PADDING)
    key = torch.where(chosen, float("-inf"), key)
    return key.argmax(dim=1)


def _nearest_other_distance(v_hat, real):
    """[B, N]: each token's cosine distance to its nearest other real token (inf if none)."""
    B, N, _ = v_hat.shape
    nearest = torch.empty(B, N, device=v_hat.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (B * N))
    for start in range(0, N, rows_per_chunk):
        stop = min(start + rows_per_chunk, N)
        distance = 1.0 - v_hat[:, start:stop] @ v_hat.transpose(1, 2)  # [B, rows, N]
        distance.masked_fill_(~real[:, None, :] | distance.isnan(), float("inf"))
        own = torch.arange(start, stop, device=v_hat.device)
        distance[:, own - start, own] = float("inf")  # a token is not its own neighbour
        nearest[:, start:stop] = distance.amin(dim=-1)
    return nearest
