"""The selection methods compared by ``zspaprune eval``, each a ``ZSPAPruneLlava`` that keeps
``keep`` visual tokens per image and hands the language model the shortened sequence:

- ``zspaprune`` at a ``relevance_ratio`` (0: DivPrune, 1: prompt relevance only);
- ``random``: ``keep`` candidates drawn uniformly without replacement;
- ``uniform``: a spatially even subsample: on a square grid of candidates, ``round(sqrt(keep))``
  evenly spaced rows with evenly spaced tokens in each (``keep`` in all); otherwise every
  ``N / keep``-th candidate in raster order.

The baselines replace only the choice of indices (``ZSPAPruneLlava._select``): the vision tower,
the candidates (LLaVA-NeXT's newlines excluded) and the shortened sequence are the same for
every method.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from zspaprune_ops.llava import ZSPAPruneLlava

BASELINES = ("random", "uniform")


@dataclass(frozen=True)
class Method:
    """``name`` is ``zspaprune`` (with ``ratio``) or one of ``BASELINES``."""

    name: str
    ratio: Optional[float] = None

    @property
    def label(self) -> str:
        if self.name != "zspaprune":
            return self.name
        extra = {0.0: " (DivPrune)", 1.0: " (relevance only)"}.get(self.ratio, "")
        return f"ratio {self.ratio:g}{extra}"

    def wrap(self, model, keep: int, generator: torch.Generator) -> ZSPAPruneLlava:
        if self.name == "zspaprune":
            return ZSPAPruneLlava(model, keep=keep, relevance_ratio=self.ratio)
        return BaselinePrune(model, keep, self.name, generator)


class BaselinePrune(ZSPAPruneLlava):
    """``ZSPAPruneLlava`` with the op replaced by ``random_pick`` or ``uniform_pick``."""

    def __init__(self, model, keep: int, method: str, generator: torch.Generator):
        super().__init__(model, keep=keep)
        if method not in BASELINES:
            raise ValueError(f"method must be one of {BASELINES}, got {method!r}")
        self.method = method
        self.generator = generator

    def _select(self, visual, prompt, prompt_mask, visual_mask) -> torch.Tensor:
        if visual_mask is None:
            visual_mask = torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)
        rows = [random_pick(mask, self.keep, self.generator) if self.method == "random"
                else uniform_pick(mask, self.keep) for mask in visual_mask]
        return torch.stack(rows).to(visual.device)


def random_pick(candidates: torch.Tensor, keep: int, generator: torch.Generator) -> torch.Tensor:
    """``keep`` of the True positions of ``candidates`` (bool [N]), uniformly at random without
    replacement; int64 [keep], ascending. Draws from ``generator`` (a CPU generator)."""
    positions = candidates.nonzero().squeeze(1).cpu()
    _check_keep(keep, len(positions))
    order = torch.randperm(len(positions), generator=generator)[:keep]
    return positions[order].sort().values


def uniform_pick(candidates: torch.Tensor, keep: int) -> torch.Tensor:
    """A spatially even ``keep`` of the True positions of ``candidates`` (bool [N]); int64
    [keep], ascending (see the module docstring)."""
    positions = candidates.nonzero().squeeze(1).cpu()
    _check_keep(keep, len(positions))
    side = math.isqrt(len(candidates))
    if bool(candidates.all()) and side * side == len(candidates):
        lattice = _lattice(side, keep)
        if lattice is not None:
            return lattice
    steps = ((torch.arange(keep, dtype=torch.float64) + 0.5) * len(positions) / keep).long()
    return positions[steps]


def _lattice(side: int, keep: int) -> Optional[torch.Tensor]:
    """Raster indices of ``keep`` cells of a side x side grid: evenly spaced rows, evenly spaced
    cells in each; None where a row would need more cells than the grid has."""
    rows = max(1, round(math.sqrt(keep)))
    counts = [keep // rows + (i < keep % rows) for i in range(rows)]
    if rows > side or max(counts) > side:
        return None
    picks = [int((i + 0.5) * side / rows) * side + int((j + 0.5) * side / count)
             for i, count in enumerate(counts) for j in range(count)]
    return torch.tensor(picks, dtype=torch.int64)


def _check_keep(keep: int, available: int) -> None:
    if not 1 <= keep <= available:
        raise ValueError(f"keep must be in [1, {available}] (the candidates), got {keep}")
