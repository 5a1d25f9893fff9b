"""Compatibility path: the LLaVA / LLaVA-NeXT wrapper lives in ``zspaprune_ops.models.llava``."""
from zspaprune_ops.models.llava import PrunedInputs, ZSPAPruneLlava, position_ids_from_mask

__all__ = ["ZSPAPruneLlava", "PrunedInputs", "position_ids_from_mask"]
