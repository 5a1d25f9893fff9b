"""Hugging Face model integrations: one module per family, ``sequence`` for the surgery they
share, ``base`` for the surface they share and the front door.

    import zspaprune_ops
    model = zspaprune_ops.ZSPAPruneModel.from_pretrained("path/to/checkpoint", keep=64)
    wrapped = zspaprune_ops.prune(hf_model, keep=64, processor=processor)  # already loaded

``families()`` is the registry of the supported families (``Family``: name, config
``model_type``, Hugging Face class), collected from the wrappers; the commands and the docs
name families from it (docs/families.md: the family table). Adding a family is one new module
here defining a ``ZSPAPruneModel`` subclass with its ``families``. Importing this package does
not import transformers.
"""
from zspaprune_ops.models.base import (Family, ZSPAPruneModel, families, family_names, prune,
                                       wrapper_class)
from zspaprune_ops.models.sequence import PrunedInputs

__all__ = ["Family", "ZSPAPruneModel", "PrunedInputs", "families", "family_names", "prune",
           "wrapper_class"]
