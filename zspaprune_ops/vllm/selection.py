"""Which visual tokens each image keeps: the HF wrapper's rule, with one op call per batch.

No vLLM import here: this module is plain PyTorch on lists of per-image tensors.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

import zspaprune_ops  # noqa: F401  (registers torch.ops.zspaprune.select)
from zspaprune_ops._validate import check_budget


@dataclass(frozen=True)
class PruningConfig:
    """``keep`` visual tokens per image (>= 1), ``relevance_ratio`` of them by prompt relevance
    (in [0, 1]); the rest by diversity."""

    keep: int = 64
    relevance_ratio: float = 0.5

    def __post_init__(self):
        check_budget(self.keep, self.relevance_ratio)
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")

    def kept_count(self, tokens: int, newlines: int = 0) -> int:
        """Tokens an image keeps out of ``tokens``, ``newlines`` of them LLaVA-NeXT row ends:
        all if they fit in ``keep``; else the newlines go, then at most ``keep`` remain."""
        return tokens if tokens <= self.keep else min(self.keep, tokens - newlines)


def choose_tokens(features: Sequence[torch.Tensor], prompts: Sequence[torch.Tensor],
                  config: PruningConfig,
                  newline: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Kept positions per image, int64 ascending, ``config.kept_count`` of them.

    Args:
        features: per image, its visual tokens [N_i, D] (LLaVA-NeXT: packed, newlines
            included), all of one float dtype.
        prompts: per image, the embeddings [T_i, D] of its prompt's text tokens (T_i may be 0).
        newline: [D], LLaVA-NeXT's image-newline vector (None for LLaVA); tokens equal to it
            are never candidates.

    Images that fit in ``keep`` are kept whole (newlines dropped first if that makes them fit);
    all others go through one ``torch.ops.zspaprune.select`` call, padded with masks.
    """
    kept: List[Optional[torch.Tensor]] = []
    to_prune, candidates = [], []
    for image, feature in enumerate(features):
        n = feature.shape[0]
        if n <= config.keep:
            kept.append(torch.arange(n, device=feature.device))
            continue
        real = torch.ones(n, dtype=torch.bool, device=feature.device)
        if newline is not None:
            real = (feature != newline.to(feature)).any(dim=-1)
        if int(real.sum()) <= config.keep:
            kept.append(real.nonzero().squeeze(1))
            continue
        kept.append(None)
        to_prune.append(image)
        candidates.append(real)
    if to_prune:
        visual, visual_mask = _pad([features[i] for i in to_prune], candidates)
        prompt_rows = [prompts[i] for i in to_prune]
        prompt, prompt_mask = _pad(prompt_rows, [p.new_ones(p.shape[0], dtype=torch.bool)
                                                 for p in prompt_rows])
        picks = torch.ops.zspaprune.select(visual, prompt.to(visual.dtype), config.keep,
                                           float(config.relevance_ratio), prompt_mask,
                                           visual_mask)
        for image, row in zip(to_prune, picks):
            kept[image] = row
    return kept


def _pad(rows: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]):
    """Stack [n_i, D] rows into zeros [M, max(n_i, 1), D] and their bool masks [M, max(n_i, 1)]."""
    width = max(1, max(row.shape[0] for row in rows))
    padded = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=rows[0].device)
    for i, (row, real) in enumerate(zip(rows, masks)):
        padded[i, :row.shape[0]] = row
        mask[i, :row.shape[0]] = real
    return padded, mask


__all__ = ["PruningConfig", "choose_tokens"]
