"""Fused Triton kernels of the selection (installed as ``zspaprune_ops.kernels``).

``select_batched`` has the contract of ``zspaprune_ops.reference.naive.select_batched``: checked
batched inputs in, int64 [B, keep] ascending indices out, in two kernel launches. On CPU it runs
only under Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported).
"""
from .select import _interpreted as interpreted
from .select import select_batched

__all__ = ["select_batched", "interpreted"]
