"""Fused Triton kernels of the selection (installed as ``zspaprune_ops.kernels``).

``select_batched`` has the contract of ``zspaprune_ops.reference.naive.select_batched``: checked
batched inputs in, int64 [B, keep] ascending indices out, in three kernel launches (per chunk of
images in Gram mode), no host-device sync but one after a cooperative streaming launch (outside
CUDA-graph capture). A row whose cooperative launch failed is all -1 (``picks[:, 0] < 0`` is the
per-image flag, read without a sync) and the call raises. ``warmup`` compiles every variant a
feature dtype and size can launch, so that serving meets no compile. On CPU the kernels run only
under Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported). Design:
kernels/README.md.
"""
from .select import _interpreted as interpreted
from .select import select_batched, warmup

__all__ = ["select_batched", "warmup", "interpreted"]
