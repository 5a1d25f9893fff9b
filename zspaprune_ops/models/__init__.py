"""Hugging Face model integrations: one module per family, ``sequence`` for the surgery they
share, ``base`` for the surface they share and the front door.

    import zspaprune_ops
    model = zspaprune_ops.ZSPAPruneModel.from_pretrained("path/to/checkpoint", keep=64)
    wrapped = zspaprune_ops.prune(hf_model, keep=64, processor=processor)  # already loaded

Supported: LLaVA, LLaVA-NeXT (``llava``), Qwen2.5-VL (``qwen2_5_vl``), Qwen3-VL (``qwen3_vl``),
LLaVA-OneVision (``llava_onevision``), InternVL (``internvl``), Gemma 3 (``gemma3``); the
family table is in docs/families.md.
Adding a family is one new module here defining a ``ZSPAPruneModel`` subclass. Importing this
package does not import transformers.
"""
from zspaprune_ops.models.base import ZSPAPruneModel, prune, wrapper_class
from zspaprune_ops.models.sequence import PrunedInputs

__all__ = ["ZSPAPruneModel", "PrunedInputs", "prune", "wrapper_class"]
