"""zspaprune: ZSPAPrune visual-token selection as ``torch.ops.zspaprune.select``.

Importing this package registers the op. ``select`` is the friendly wrapper; the pure-PyTorch
reference is ``zspaprune_ops.reference.select``. ``prune(model)`` /
``ZSPAPruneModel.from_pretrained(path)`` wrap a Hugging Face model of a supported family
(``zspaprune_ops.models.families()``; transformers is imported only then).
"""
from zspaprune_ops import op as _op  # noqa: F401  (registers torch.ops.zspaprune.select)
from zspaprune_ops._validate import set_value_checks
from zspaprune_ops.functional import select
from zspaprune_ops.models import ZSPAPruneModel, prune

__all__ = ["select", "set_value_checks", "prune", "ZSPAPruneModel"]
__version__ = "0.1.0"
