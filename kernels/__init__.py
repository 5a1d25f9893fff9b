"""Fused Triton kernels of the selection (installed as ``zspaprune_ops.kernels``)."""
