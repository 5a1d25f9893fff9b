"""Which visual tokens each item keeps, given its candidates and its prompt: the one home of
that rule for the Hugging Face wrappers and the vLLM plugin alike (``prompt.py`` decides the
prompt).

An *item* is one image or one video: its visual tokens [N_i, D] in the language model's space.
Its budget is ``Budget.count(N_i)``; an item with at most that many tokens stays whole; one
whose candidates (LLaVA-NeXT drops its row-end newline tokens) number at most that many keeps
all its candidates; the others go to the selection, one call per distinct budget.
"""
import functools
import math
from dataclasses import dataclass
from numbers import Real
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from zspaprune_ops._validate import check_budget

Selector = Callable[..., torch.Tensor]
"""``selector(visual [M, N, D], prompt [M, T, D], keep: int, relevance_ratio: float,
prompt_mask bool [M, T], visual_mask bool [M, N] or None) -> int64 [M, keep]``, ascending
indices per row: the signature of ``torch.ops.zspaprune.select``."""


def zspaprune_selector(backend: str = "auto") -> Selector:
    """ZSPAPrune as a ``Selector``: ``torch.ops.zspaprune.select`` for ``"auto"``, else
    ``zspaprune_ops.select`` with that backend."""
    if backend == "auto":
        return torch.ops.zspaprune.select
    import zspaprune_ops

    return functools.partial(_select_with, zspaprune_ops.select, backend)


def _select_with(select, backend, visual, prompt, keep, relevance_ratio, prompt_mask,
                 visual_mask):
    return select(visual, prompt, keep, relevance_ratio, prompt_mask=prompt_mask,
                  visual_mask=visual_mask, backend=backend)


@dataclass(frozen=True)
class Budget:
    """``keep`` visual tokens per item: an int (>= 1) is a count; a float in (0, 1] a share of
    each item's tokens, ``max(1, floor(keep * N + 0.5))`` of N (1.0 keeps every item whole).
    ``relevance_ratio`` (in [0, 1]) of them form the relevance core."""

    keep: Union[int, float] = 64
    relevance_ratio: float = 0.0  # DivPrune: no model measured gained from a core: evidence.md

    def __post_init__(self):
        keep = self.keep
        if isinstance(keep, float):
            if not 0.0 < keep <= 1.0:  # False for NaN too
                raise ValueError(f"keep as a share of each image's tokens must be in (0, 1], "
                                 f"got {keep}")
            check_budget(1, self.relevance_ratio)
        elif isinstance(keep, Real) and not isinstance(keep, (bool, int)):
            raise TypeError(f"keep must be an int (tokens) or a float in (0, 1] (a share), got "
                            f"{type(keep).__name__}")
        else:
            keep = check_budget(keep, self.relevance_ratio)  # TypeError for bools, tensors...
            if keep < 1:
                raise ValueError(f"keep must be >= 1, got {keep}")
            object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "relevance_ratio", float(self.relevance_ratio))

    def count(self, tokens: int) -> int:
        """The budget of an item of ``tokens`` tokens (before capping at its candidates)."""
        if isinstance(self.keep, float):
            return max(1, math.floor(self.keep * tokens + 0.5))
        return self.keep

    def kept_count(self, tokens: int, non_candidates: int = 0) -> int:
        """Tokens kept of an item of ``tokens`` tokens, ``non_candidates`` of them never
        candidates (LLaVA-NeXT's newlines): all if they fit; else at most the budget of the
        candidates."""
        budget = self.count(tokens)
        return tokens if tokens <= budget else min(budget, tokens - non_candidates)


def candidates_without(feature: torch.Tensor, vector: Optional[torch.Tensor]
                       ) -> Optional[torch.Tensor]:
    """bool [N]: the rows of ``feature`` [N, D] not equal to ``vector`` [D] (LLaVA-NeXT's
    image-newline, which carries no image content and whose copies would tie in relevance);
    None (all candidates) without a vector."""
    if vector is None:
        return None
    return (feature != vector.to(feature)).any(dim=-1)


@dataclass
class Choice:
    """Kept positions per item (int64, ascending) and a 0-dim bool tensor: True if the selector
    returned a negative index for an item it pruned (read at the caller's next host sync)."""

    kept: List[torch.Tensor]
    invalid: torch.Tensor


def choose(features: Sequence[torch.Tensor], candidates: Sequence[Optional[torch.Tensor]],
           prompts: Sequence[torch.Tensor], budget: Budget, selector: Selector) -> Choice:
    """The kept positions of every item.

    Args:
        features: per item, its visual tokens [N_i, D], one float dtype.
        candidates: per item, bool [N_i] (True = may be chosen) or None (all).
        prompts: per item, its prompt's token embeddings [T_i, D] (T_i may be 0).
        budget: the tokens kept per item and the relevance ratio.
        selector: see ``Selector``; called once per distinct budget among pruned items.
    """
    kept: List[Optional[torch.Tensor]] = []
    groups: Dict[int, List[int]] = {}
    for item, (feature, real) in enumerate(zip(features, candidates)):
        n, count = feature.shape[0], budget.count(feature.shape[0])
        if n <= count:
            kept.append(torch.arange(n, device=feature.device))
        elif real is not None and int(real.sum()) <= count:
            kept.append(real.nonzero().squeeze(1))
        else:
            kept.append(None)
            groups.setdefault(count, []).append(item)
    device = features[0].device if len(features) else torch.device("cpu")
    invalid = torch.zeros((), dtype=torch.bool, device=device)
    for count, items in groups.items():
        visual, visual_mask = pad_rows([features[i] for i in items],
                                       [candidates[i] for i in items])
        prompt, prompt_mask = pad_rows([prompts[i].to(visual.dtype) for i in items],
                                       [None] * len(items), always_mask=True)
        picks = selector(visual, prompt, count, budget.relevance_ratio, prompt_mask,
                         visual_mask)
        invalid = invalid | (picks < 0).any()
        for item, row in zip(items, picks):
            kept[item] = row
    return Choice(kept, invalid)


def pad_rows(rows: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]],
             always_mask: bool = False):
    """Stack [n_i, D] rows into zero-padded [M, max(n_i, 1), D] and a bool mask
    [M, max(n_i, 1)] (True = a real row that ``masks[i]``, None = all, allows). The mask is
    None when every row has the same length and no mask, unless ``always_mask``."""
    same = all(r.shape[0] == rows[0].shape[0] for r in rows) and all(m is None for m in masks)
    if same and rows[0].shape[0] > 0 and not always_mask:
        return torch.stack(rows), None
    width = max(1, max(r.shape[0] for r in rows))
    padded = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=rows[0].device)
    for i, (row, real) in enumerate(zip(rows, masks)):
        padded[i, :row.shape[0]] = row
        mask[i, :row.shape[0]] = True if real is None else real
    return padded, mask


__all__ = ["Budget", "Choice", "Selector", "candidates_without", "choose", "pad_rows",
           "zspaprune_selector"]
