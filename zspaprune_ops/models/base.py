"""``ZSPAPruneModel``: the surface every family's wrapper shares, and the front door ``prune``.

A family is one module in ``zspaprune_ops.models`` defining a subclass with
``model_class_names`` (the Hugging Face classes it wraps) and ``prune_inputs``; ``prune`` finds
it by importing every module of the package. Nothing here imports transformers.
"""
import contextlib
import importlib
import pkgutil
from typing import Optional, Tuple

import torch

import zspaprune_ops
from zspaprune_ops._validate import check_budget
from zspaprune_ops.dispatch import BACKENDS
from zspaprune_ops.models.sequence import PrunedInputs, check_positions, reject_unpruned_kwargs


class ZSPAPruneModel(torch.nn.Module):
    """A Hugging Face vision-language model that keeps only ``keep`` visual tokens per image
    (and per video), chosen by ZSPAPrune, before its language model runs.

    ``ZSPAPruneModel(model, ...)`` or ``zspaprune_ops.prune(model, ...)`` picks the wrapper of
    ``model``'s family; ``ZSPAPruneModel.from_pretrained(path, ...)`` loads and wraps.

    Args:
        model: the loaded Hugging Face model (any dtype, device and attention implementation).
        keep: visual tokens kept per image / video (>= 1); one with fewer keeps them all.
        relevance_ratio: share of ``keep`` chosen by prompt relevance, in [0, 1].
        backend: ``"auto"`` calls ``torch.ops.zspaprune.select``; any other backend of
            ``zspaprune_ops.select`` (e.g. ``"reference"``) goes through that wrapper.
        positions: ``"original"`` (kept tokens and the text after them keep their positions in
            the unpruned sequence) or ``"compact"`` (positions counted over the shortened
            sequence). Default: the family's ``default_positions``.
    """

    model_class_names: Tuple[str, ...] = ()
    default_positions = "original"
    visual_inputs: Tuple[str, ...] = ()
    """Keyword inputs of ``prune_inputs`` besides ``pixel_values`` (e.g. ``image_sizes``)."""

    def __new__(cls, model=None, *args, **kwargs):
        if cls is ZSPAPruneModel:
            cls = wrapper_class(model)
        return super().__new__(cls)

    def __init__(self, model, keep: int = 64, relevance_ratio: float = 0.5,
                 backend: str = "auto", positions: Optional[str] = None):
        super().__init__()
        if not self.handles(model):
            names = " or ".join(self.model_class_names)
            raise TypeError(f"model must be a {names}, got {type(model).__name__}")
        check_budget(keep, relevance_ratio)
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model
        self.keep = keep
        self.relevance_ratio = float(relevance_ratio)
        self.backend = backend
        self.positions = check_positions(positions or self.default_positions)

    @classmethod
    def handles(cls, model) -> bool:
        """Whether ``model`` is (a subclass of) one of ``model_class_names``."""
        return any(base.__name__ in cls.model_class_names for base in type(model).__mro__)

    @classmethod
    def from_pretrained(cls, path, keep: int = 64, relevance_ratio: float = 0.5,
                        backend: str = "auto", positions: Optional[str] = None,
                        **hf_kwargs) -> "ZSPAPruneModel":
        """Load a checkpoint with ``AutoModelForImageTextToText`` (``hf_kwargs`` go to its
        ``from_pretrained``: ``dtype``, ``device_map``, ``attn_implementation``, ...) and wrap it
        (TypeError if its class is not one the wrapper supports)."""
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, **hf_kwargs).eval()
        return cls(model, keep, relevance_ratio, backend, positions)

    def unwrap(self):
        """The wrapped Hugging Face model (also ``self.model``)."""
        return self.model

    # ---------------------------------------------------------------- public entry points
    def prune_inputs(self, input_ids: torch.Tensor, pixel_values=None, attention_mask=None,
                     **kwargs) -> PrunedInputs:  # pragma: no cover - every family overrides
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                prompt_mask: Optional[torch.Tensor] = None, **kwargs):
        """The wrapped model's forward on the pruned sequence; its output (``logits``
        [B, L', V] for the shortened sequence). The visual inputs the processor returns go to
        ``prune_inputs``; other ``kwargs`` to the model's forward."""
        visual = self._split_visual(kwargs)
        if pixel_values is None and visual.get("pixel_values_videos") is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        pruned = self.prune_inputs(input_ids, pixel_values, attention_mask,
                                   prompt_mask=prompt_mask, **visual)
        with self.language_inputs(pruned):
            return self.model(inputs_embeds=pruned.inputs_embeds,
                              attention_mask=pruned.attention_mask,
                              position_ids=pruned.position_ids, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 prompt_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Prune, then the model's ``generate``; returns only the new tokens, int64 [B, new].

        The shortened batch is left-padded, so right-padded inputs generate correctly too; new
        tokens continue from the last token's position (``position_ids`` of ``prune_inputs``).
        """
        visual = self._split_visual(kwargs)
        if pixel_values is None and visual.get("pixel_values_videos") is None:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      **kwargs)
            return out[:, input_ids.shape[1]:]
        pruned = self.prune_inputs(input_ids, pixel_values, attention_mask,
                                   prompt_mask=prompt_mask, padding_side="left", **visual)
        with self.language_inputs(pruned):
            return self.model.generate(inputs_embeds=pruned.inputs_embeds,
                                       attention_mask=pruned.attention_mask,
                                       position_ids=pruned.position_ids, **kwargs)

    # ---------------------------------------------------------------- for the families
    def language_inputs(self, pruned: PrunedInputs):
        """Context in which the model runs on ``pruned`` (a family may set model state or pass
        ``pruned.model_kwargs`` to its language model)."""
        return contextlib.nullcontext()

    def _split_visual(self, kwargs) -> dict:
        """Pop the visual inputs of ``prune_inputs`` out of ``kwargs``; reject the others that
        refer to the unpruned sequence."""
        visual = {name: kwargs.pop(name) for name in self.visual_inputs if name in kwargs}
        reject_unpruned_kwargs(kwargs, type(self).__name__)
        return visual

    def _select(self, visual, prompt, prompt_mask, visual_mask) -> torch.Tensor:
        """ZSPAPrune on [M, N, D] candidates: int64 [M, keep] (the op, or the chosen backend)."""
        if self.backend == "auto":
            return torch.ops.zspaprune.select(visual, prompt, self.keep, self.relevance_ratio,
                                              prompt_mask, visual_mask)
        return zspaprune_ops.select(visual, prompt, self.keep, self.relevance_ratio,
                                    prompt_mask=prompt_mask, visual_mask=visual_mask,
                                    backend=self.backend)


def _families():
    import zspaprune_ops.models as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    pending, found = [ZSPAPruneModel], []
    while pending:
        for sub in pending.pop().__subclasses__():
            found.append(sub)
            pending.append(sub)
    return [cls for cls in found if cls.model_class_names]


def wrapper_class(model) -> type:
    """The ``ZSPAPruneModel`` subclass for ``model``'s class; TypeError naming the supported
    classes otherwise."""
    families = _families()
    for cls in families:
        if cls.handles(model):
            return cls
    names = sorted(name for cls in families for name in cls.model_class_names)
    raise TypeError(f"zspaprune supports {', '.join(names)}; got {type(model).__name__}")


def prune(model, keep: int = 64, relevance_ratio: float = 0.5, backend: str = "auto",
          positions: Optional[str] = None) -> ZSPAPruneModel:
    """Wrap a loaded LLaVA, LLaVA-NeXT, Qwen2.5-VL or Qwen3-VL model so that it keeps ``keep``
    visual tokens per image / video (arguments as ``ZSPAPruneModel``)."""
    return wrapper_class(model)(model, keep, relevance_ratio, backend, positions)
