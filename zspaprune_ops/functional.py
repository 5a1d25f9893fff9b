"""The friendly entry point: ``zspaprune_ops.select``."""
from typing import Optional

import torch

from zspaprune_ops._validate import check_inputs, check_real_counts
from zspaprune_ops.dispatch import implementation


def select(visual: torch.Tensor, prompt: torch.Tensor, keep: int, relevance_ratio: float = 0.5,
           *, prompt_mask: Optional[torch.Tensor] = None,
           visual_mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Keep ``keep`` visual tokens per image by ZSPAPrune; returns their indices, ascending.

    Args:
        visual: [B, N, D] or [N, D] projected visual tokens; float16, bfloat16 or float32.
        prompt: [B, T, D] or [T, D] prompt token embeddings; any of those dtypes.
        keep: tokens to keep, 1 <= keep <= N (and <= the real tokens of every row); an int or
            any integer-like value (``numpy.int64``...), not a bool.
        relevance_ratio: share of ``keep`` taken by prompt relevance, in [0, 1]. The default
            0.5 is this project's choice; the paper does not publish its value.
        prompt_mask: bool [B, T] or [T], True = real prompt token. Default: all real.
        visual_mask: bool [B, N] or [N], True = real visual token. Default: all real.
        backend: ``"auto"`` runs ``torch.ops.zspaprune.select`` (the fused Triton kernels on
            CUDA, the blocked pure-PyTorch path elsewhere); ``"triton"`` forces the kernels (on
            CPU only under Triton's interpreter, ``TRITON_INTERPRET=1`` set before triton is
            imported, else RuntimeError); ``"blocked"`` forces the blocked pure-PyTorch path
            (``zspaprune_ops.blocked``); ``"reference"`` forces the readable pure-PyTorch
            reference (one pick per step: slow).
    Returns:
        int64 [B, keep] (or [keep] for unbatched inputs) on the input device.
    """
    batch = check_inputs(visual, prompt, keep, relevance_ratio, prompt_mask, visual_mask)
    keep = batch.keep  # a Python int, whatever integer-like value was given
    if backend == "auto":
        kept = torch.ops.zspaprune.select(batch.visual, batch.prompt, keep,
                                          float(relevance_ratio), batch.prompt_mask,
                                          batch.visual_mask)
    else:
        run = implementation(backend, batch.visual.device)
        check_real_counts(batch.visual_mask, keep)
        kept = run(batch.visual, batch.prompt, keep, relevance_ratio, batch.prompt_mask,
                   batch.visual_mask)
    return kept[0] if batch.unbatched else kept
