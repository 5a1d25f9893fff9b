"""``ZSPAPruneModel``: the surface every family's wrapper shares, and the front door ``prune``.

A family is one module in ``zspaprune_ops.models`` defining a subclass with ``families`` (the
``Family`` records of the Hugging Face classes it wraps) and ``prune_inputs``; ``prune`` finds
it by importing every module of the package, and ``families()`` is the registry every command
and document names the supported families from. Nothing here imports transformers.
"""
import contextlib
import importlib
import pkgutil
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from zspaprune_ops.choice import Budget, Choice, Selector, choose, zspaprune_selector
from zspaprune_ops.dispatch import BACKENDS
from zspaprune_ops.models.sequence import (PrunedInputs, check_positions, item_prompts,
                                           reject_unpruned_kwargs)
from zspaprune_ops.prompt import ChatLayout, check_prompt_mode


@dataclass(frozen=True)
class Family:
    """A model family the wrappers support: ``name`` as the documentation writes it
    ("LLaVA-OneVision"), the ``model_type`` of its Hugging Face config ("llava_onevision") and
    its Hugging Face class name ("LlavaOnevisionForConditionalGeneration")."""

    name: str
    model_type: str
    model_class: str


class ZSPAPruneModel(torch.nn.Module):
    """A Hugging Face vision-language model that keeps only ``keep`` visual tokens per image
    (and per video), chosen by ZSPAPrune, before its language model runs.

    ``ZSPAPruneModel(model, ...)`` or ``zspaprune_ops.prune(model, ...)`` picks the wrapper of
    ``model``'s family; ``ZSPAPruneModel.from_pretrained(path, ...)`` loads and wraps.

    Args:
        model: the loaded Hugging Face model (any dtype, device and attention implementation).
        keep: visual tokens kept per image / video: an int (>= 1; an item with fewer keeps
            them all) or a float in (0, 1], a share of each item's tokens
            (``max(1, floor(keep * N + 0.5))``; 1.0 keeps everything).
        relevance_ratio: share of ``keep`` chosen by prompt relevance, in [0, 1]; the default,
            0, is DivPrune (no model measured so far gained from a relevance core:
            docs/evidence.md).
        backend: ``"auto"`` calls ``torch.ops.zspaprune.select``; any other backend of
            ``zspaprune_ops.select`` (e.g. ``"reference"``) goes through that wrapper.
        positions: ``"original"`` (kept tokens and the text after them keep their positions in
            the unpruned sequence) or ``"compact"`` (positions counted over the shortened
            sequence). Default: the family's ``default_positions``.
        processor: the model's processor or tokenizer: its chat template tells which tokens are
            the user's words (``prompt="message"``). Without one, ``"message"`` falls back to
            ``"all"`` with a warning.
        prompt: ``"message"`` (default): each image's relevance prompt is the text of the user
            message holding it; ``"all"``: every real text token. An explicit ``prompt_mask``
            passed to ``forward`` / ``generate`` / ``prune_inputs`` always wins.
        selector: the selection function (``zspaprune_ops.choice.Selector``: the signature of
            ``torch.ops.zspaprune.select``); default: ZSPAPrune through ``backend``. Baselines
            (random, uniform) plug in here.
    """

    families: Tuple[Family, ...] = ()
    """The families this wrapper handles (its module's; a subclass sets its own)."""
    model_class_names: Tuple[str, ...] = ()
    """The Hugging Face class names of ``families``."""
    default_positions = "original"
    visual_inputs: Tuple[str, ...] = ()
    """Keyword inputs of ``prune_inputs`` besides ``pixel_values`` (e.g. ``image_sizes``)."""
    inserted_text: Optional[str] = None
    """A regex of the text the family's processor writes into a user message beside its images
    (Qwen3-VL's video timestamps): never part of an image's relevance prompt."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.model_class_names = tuple(family.model_class for family in cls.families)

    def __new__(cls, model=None, *args, **kwargs):
        if cls is ZSPAPruneModel:
            cls = wrapper_class(model)
        return super().__new__(cls)

    def __init__(self, model, keep: Union[int, float] = 64,
                 relevance_ratio: float = Budget.relevance_ratio, backend: str = "auto",
                 positions: Optional[str] = None, *, processor=None, prompt: str = "message",
                 selector: Optional[Selector] = None):
        super().__init__()
        if not self.handles(model):
            names = " or ".join(self.model_class_names)
            raise TypeError(f"model must be a {names}, got {type(model).__name__}")
        self.budget = Budget(keep, relevance_ratio)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if selector is not None and not callable(selector):
            raise TypeError(f"selector must be callable, got {type(selector).__name__}")
        if selector is not None and backend != "auto":
            raise ValueError("give either selector or backend, not both")
        self.model = model
        self.backend = backend
        self.positions = check_positions(positions or self.default_positions)
        self.prompt = check_prompt_mode(prompt)
        self.layout = ChatLayout.of(processor)
        self.selector = selector or zspaprune_selector(backend)

    @property
    def keep(self) -> Union[int, float]:
        return self.budget.keep

    @property
    def relevance_ratio(self) -> float:
        return self.budget.relevance_ratio

    @classmethod
    def handles(cls, model) -> bool:
        """Whether ``model`` is (a subclass of) one of ``model_class_names``."""
        return any(base.__name__ in cls.model_class_names for base in type(model).__mro__)

    @classmethod
    def from_pretrained(cls, path, keep: Union[int, float] = 64,
                        relevance_ratio: float = Budget.relevance_ratio,
                        backend: str = "auto", positions: Optional[str] = None, *,
                        processor=None, prompt: str = "message",
                        selector: Optional[Selector] = None, **hf_kwargs) -> "ZSPAPruneModel":
        """Load a checkpoint with ``AutoModelForImageTextToText`` (``hf_kwargs`` go to its
        ``from_pretrained``: ``dtype``, ``device_map``, ``attn_implementation``, ...) and wrap it
        (TypeError if its class is not one the wrapper supports). The chat template comes from
        ``processor`` if given, else from the checkpoint (``load_chat_source``)."""
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(path, **hf_kwargs).eval()
        return cls(model, keep, relevance_ratio, backend, positions,
                   processor=processor if processor is not None else load_chat_source(path),
                   prompt=prompt, selector=selector)

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
                              position_ids=pruned.position_ids, **pruned.forward_kwargs,
                              **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 prompt_mask: Optional[torch.Tensor] = None, **kwargs):
        """Prune, then the model's ``generate``. Returns what Hugging Face returns: int64
        [B, L + new], ``input_ids`` followed by the new tokens (so ``out[:, L:]`` are the new
        tokens), or with ``return_dict_in_generate=True`` the model's output whose
        ``sequences`` are that, plus ``kept_indices`` / ``kept_video_indices`` (as
        ``PrunedInputs``).

        The shortened batch is left-padded, so right-padded inputs generate correctly too; new
        tokens continue from the last token's position (``position_ids`` of ``prune_inputs``).
        """
        visual = self._split_visual(kwargs)
        if pixel_values is None and visual.get("pixel_values_videos") is None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       **kwargs)
        pruned = self.prune_inputs(input_ids, pixel_values, attention_mask,
                                   prompt_mask=prompt_mask, padding_side="left", **visual)
        with self.language_inputs(pruned):
            out = self.model.generate(inputs_embeds=pruned.inputs_embeds,
                                      attention_mask=pruned.attention_mask,
                                      position_ids=pruned.position_ids, **pruned.forward_kwargs,
                                      **kwargs)
        if isinstance(out, torch.Tensor):  # generate from inputs_embeds gives the new tokens
            return torch.cat([input_ids, out.to(input_ids.dtype)], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences.to(input_ids.dtype)], dim=1)
        out.kept_indices = pruned.kept_indices
        out.kept_video_indices = pruned.kept_video_indices
        return out

    # ---------------------------------------------------------------- for the families
    def choose(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompt_mask: Optional[torch.Tensor], embeds: torch.Tensor,
               placeholders: torch.Tensor, features: Sequence[torch.Tensor],
               starts: Sequence[Tuple[int, int]],
               candidates: Optional[Sequence[Optional[torch.Tensor]]] = None) -> Choice:
        """The kept positions of every item: each item's prompt (``item_prompts``), then
        ``zspaprune_ops.choice.choose`` with this wrapper's budget and selector.

        Args:
            input_ids, attention_mask: [B, L]; prompt_mask: bool [B, L] or None.
            embeds: [B, L, D] token embeddings; placeholders: bool [B, L], every image/video
                placeholder; features: per item [N_i, D]; starts: per item (sample, position
                of its first placeholder); candidates: per item bool [N_i] or None (all).
        """
        inserted = re.compile(self.inserted_text) if self.inserted_text else None
        prompts = item_prompts(input_ids, attention_mask, prompt_mask, embeds, placeholders,
                               starts, self.layout, self.prompt, inserted)
        if candidates is None:
            candidates = [None] * len(features)
        return choose(features, candidates, prompts, self.budget, self.selector)

    def kept_width(self, features: Sequence[torch.Tensor]) -> int:
        """Columns of ``PrunedInputs.kept_indices``: the largest item budget (0 without items)."""
        return max((self.budget.count(f.shape[0]) for f in features), default=0)

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


def load_chat_source(path):
    """The processor (else the tokenizer) saved with a checkpoint, for its chat template; None
    if neither loads. transformers 5 keeps the template in ``chat_template.jinja``, which the
    tokenizer reads too: so Qwen's template is found even where its processor cannot load
    (no torchvision)."""
    from transformers import AutoProcessor, AutoTokenizer

    for loader in (AutoProcessor, AutoTokenizer):
        try:
            source = loader.from_pretrained(path)
        except Exception:  # noqa: BLE001 - optional: a checkpoint without a processor is fine
            continue
        if ChatLayout.of(source) is not None:
            return source
    return None


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


def families() -> List[Family]:
    """Every supported family, by name: the registry the commands and docs name them from."""
    return sorted((family for cls in _families() for family in cls.__dict__.get("families", ())),
                  key=lambda family: family.name)


def family_names(last: str = "or") -> str:
    """The supported families' names as a sentence lists them: "Gemma 3, ..., or Qwen3-VL"."""
    names = [family.name for family in families()]
    return f"{', '.join(names[:-1])} {last} {names[-1]}"


def wrapper_class(model) -> type:
    """The ``ZSPAPruneModel`` subclass for ``model``'s class; TypeError naming the supported
    classes otherwise."""
    families = _families()
    for cls in families:
        if cls.handles(model):
            return cls
    names = sorted(name for cls in families for name in cls.model_class_names)
    raise TypeError(f"zspaprune supports {', '.join(names)}; got {type(model).__name__}")


def prune(model, keep: Union[int, float] = 64, relevance_ratio: float = Budget.relevance_ratio,
          backend: str = "auto", positions: Optional[str] = None, *, processor=None,
          prompt: str = "message", selector: Optional[Selector] = None) -> ZSPAPruneModel:
    """Wrap a loaded model of a supported family so that it keeps ``keep`` visual tokens per
    image / video (arguments as ``ZSPAPruneModel``; pass the model's ``processor`` so that the
    relevance prompt is the user's message)."""
    return wrapper_class(model)(model, keep, relevance_ratio, backend, positions,
                                processor=processor, prompt=prompt, selector=selector)
