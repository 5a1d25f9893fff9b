"""The one place that decides which implementation of the selection runs."""
from typing import Callable

import torch

BACKENDS = ("auto", "triton", "blocked", "reference")


def implementation(backend: str, device: torch.device) -> Callable:
    """The batched selection function for ``backend`` on ``device``.

    ``auto``: the fused Triton kernels on CUDA, the blocked pure-PyTorch path elsewhere.
    ``triton``: the kernels on any device; on CPU they run under Triton's interpreter, which
    needs ``TRITON_INTERPRET=1`` set before ``triton`` is first imported (RuntimeError
    otherwise). ``blocked``: the fast pure-PyTorch path (``zspaprune_ops.blocked``: blocked
    matrix products, several picks per pass). ``reference``: the readable pure-PyTorch
    reference, one pick per step. Every function returned takes checked, batched inputs ``(visual, prompt, keep, relevance_ratio, prompt_mask, visual_mask)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        try:
            from zspaprune_ops import kernels
        except ImportError as error:
            raise RuntimeError(
                f"backend={backend!r} on {device.type} runs the fused Triton kernels, but triton "
                f"does not import here ({error}). Triton ships wheels for Linux only: "
                "pip install triton, or use backend='reference'") from None
        if device.type != "cuda" and not kernels.interpreted():
            raise RuntimeError(
                f"backend='triton' on {device.type} runs the kernels under Triton's interpreter: "
                "set TRITON_INTERPRET=1 before triton is first imported, or use a CUDA device")
        return kernels.select_batched
    if backend in ("auto", "blocked"):
        from zspaprune_ops.blocked import select_batched
        return select_batched
    from zspaprune_ops.reference.naive import select_batched
    return select_batched
