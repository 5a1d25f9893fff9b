"""The pure-PyTorch reference of ZSPAPrune's selection (installed as ``zspaprune_ops.reference``)."""
from .naive import select

__all__ = ["select"]
