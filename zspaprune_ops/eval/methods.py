"""The selection methods compared by ``zspaprune eval``, each a pruning wrapper of the model's
family (``zspaprune_ops.prune``) that keeps ``keep`` visual tokens per image and hands the
language model the shortened sequence:

- ``zspaprune`` at a ``relevance_ratio`` (0: DivPrune, 1: prompt relevance only);
- ``random``: ``keep`` candidates drawn uniformly without replacement;
- ``uniform``: a spatially even subsample: on a square grid of candidates, ``round(sqrt(keep))``
  evenly spaced rows with evenly spaced tokens in each (``keep`` in all); otherwise every
  ``N / keep``-th candidate in raster order.

The baselines replace only the choice of indices (the wrapper's ``selector``): the vision tower,
the candidates (LLaVA-NeXT's newlines excluded) and the shortened sequence are the same for
every method.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

import zspaprune_ops

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

    def wrap(self, model, keep: int, generator: torch.Generator, processor=None):
        if self.name == "zspaprune":
            return zspaprune_ops.prune(model, keep=keep, relevance_ratio=self.ratio,
                                       processor=processor)
        # processor: the same items as ZSPAPrune's (Gemma 3's pan-and-scan views of one image)
        return zspaprune_ops.prune(model, keep=keep, processor=processor,
                                   selector=baseline_selector(self.name, generator))


def baseline_selector(method: str, generator: torch.Generator):
    """A ``zspaprune_ops.choice.Selector`` picking by ``random_pick`` (drawing from
    ``generator``) or ``uniform_pick`` instead of ZSPAPrune."""
    if method not in BASELINES:
        raise ValueError(f"method must be one of {BASELINES}, got {method!r}")

    def select(visual, prompt, keep, relevance_ratio, prompt_mask, visual_mask) -> torch.Tensor:
        if visual_mask is None:
            visual_mask = torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)
        rows = [random_pick(mask, keep, generator) if method == "random"
                else uniform_pick(mask, keep) for mask in visual_mask]
        return torch.stack(rows).to(visual.device)

    return select


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
