"""The one place that decides which implementation of the selection runs."""
from typing import Callable

import torch

BACKENDS = ("auto", "reference")


def implementation(backend: str, device: torch.device) -> Callable:
    """The batched selection function for ``backend`` on ``device``.

    ``auto``: the reference on every device for now (the fused kernels take over CUDA when
    they land). ``reference``: the pure-PyTorch reference. Every function returned takes
    checked, batched inputs ``(visual, prompt, keep, relevance_ratio, prompt_mask, visual_mask)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from zspaprune_ops.reference.naive import select_batched
    return select_batched
