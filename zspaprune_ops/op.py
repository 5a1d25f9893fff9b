"""``torch.ops.zspaprune.select``: the custom op, usable in eager mode and torch.compile graphs."""
from typing import Optional

import torch

from zspaprune_ops._validate import check_inputs, check_real_counts
from zspaprune_ops.dispatch import implementation


@torch.library.custom_op("zspaprune::select", mutates_args=())
def select(visual: torch.Tensor, prompt: torch.Tensor, keep: int, relevance_ratio: float,
           prompt_mask: Optional[torch.Tensor] = None,
           visual_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ZSPAPrune selection on a batch: visual [B, N, D], prompt [B, T, D] -> int64 [B, keep]."""
    batch = check_inputs(visual, prompt, keep, relevance_ratio, prompt_mask, visual_mask,
                         allow_unbatched=False)
    check_real_counts(visual_mask, keep)
    run = implementation("auto", visual.device)
    return run(visual, prompt, keep, relevance_ratio, batch.prompt_mask, batch.visual_mask)


@select.register_fake
def _(visual, prompt, keep, relevance_ratio, prompt_mask=None, visual_mask=None):
    check_inputs(visual, prompt, keep, relevance_ratio, prompt_mask, visual_mask,
                 allow_unbatched=False)
    return visual.new_empty((visual.shape[0], keep), dtype=torch.int64)
