"""The plugin's per-image prompt, shared by every pruned vLLM model (LLaVA, LLaVA-NeXT, Qwen):
the settings, the processor mixin that finds each visual item's relevance prompt and puts it
into that item's multimodal hash, and the model-side helpers.

How it fits vLLM 0.32's processing:

- ``apply`` receives the prompt's token ids with one placeholder per item (or a run of them).
  ``zspaprune_ops.prompt.prompt_positions`` (the rule the Hugging Face wrappers use) picks each
  item's prompt tokens with a ``ChatLayout`` of the served model's chat template; their ids go
  into the processor kwargs under ``PROMPT_KWARG``, per modality, one tuple per item.
- ``_get_mm_hashes`` hashes each item with vLLM's own identity (item, processor kwargs,
  UUIDs: our kwarg removed) and *only its own* prompt ids. The hash keys the encoder cache, the
  processor cache and prefix caching, so an image keeps its hash while later turns are appended
  to a chat, and a second request of the conversation hits the prefix cache through it.
  (Without the prompt in the hash a cached selection made for one question would be served to
  another.) vLLM's Qwen3-VL hashes its per-video ``fps`` the same way.
- ``_get_cache_missing_processor_kwargs`` keeps the prompts of the items the processor cache
  misses, so ``_postprocess_hf_mm_data`` can attach each processed item its prompt ids as a
  per-item field (``PROMPT_FIELDS``); ``embed_multimodal`` receives them with the pixels.
"""
import dataclasses
import os
import re
from functools import cached_property
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from zspaprune_ops.choice import Budget
from zspaprune_ops.prompt import ChatLayout, check_prompt_mode, prompt_positions
from zspaprune_ops.vllm import KEEP_KEY, PROMPT_KEY, RATIO_KEY

PROMPT_KWARG = "zspaprune_item_prompts"
"""Processor kwarg (never hashed as a whole): ``ItemPrompts``, each item's prompt token ids."""
PROMPT_FIELDS = {"image": "zspaprune_prompt_ids", "video": "zspaprune_video_prompt_ids"}
"""Per-item field of each modality: int64 [T], the item's prompt token ids (T may be 0)."""
RECORD_ENV = "ZSPAPRUNE_RECORD_SELECTIONS"
"""Set to a positive number N to keep the last N selections on the model (for inspection)."""


def pruning_config(hf_config) -> Budget:
    """The pruning settings in a model config (defaults keep=64, relevance_ratio=0); raises
    ValueError / TypeError naming the config key when a setting is out of range."""
    keep = getattr(hf_config, KEEP_KEY, Budget.keep)
    ratio = getattr(hf_config, RATIO_KEY, Budget.relevance_ratio)
    try:
        return Budget(keep, ratio)
    except (TypeError, ValueError) as error:
        raise type(error)(f"invalid ZSPAPrune setting ({KEEP_KEY}={keep!r}, {RATIO_KEY}="
                          f"{ratio!r}): {error}") from error


def prompt_setting(hf_config) -> str:
    """The config's ``zspaprune_prompt`` (default ``"message"``); ValueError naming the key and
    the options for another value."""
    prompt = getattr(hf_config, PROMPT_KEY, "message")
    try:
        return check_prompt_mode(prompt)
    except ValueError as error:
        raise ValueError(f"invalid ZSPAPrune setting ({PROMPT_KEY}={prompt!r}): {error}"
                         ) from error


def placeholder_starts(ids: Sequence[int], placeholder: int, count: int) -> Optional[List[int]]:
    """The position of each of ``count`` items' first placeholder in ``ids``: one placeholder
    token per item (a prompt before vLLM expands it), or one run of them per item (a prompt
    given expanded). None when neither fits (adjacent expanded items cannot be told apart)."""
    tokens = [p for p, i in enumerate(ids) if i == placeholder]
    if len(tokens) == count:
        return tokens
    runs = [p for p in tokens if p == 0 or ids[p - 1] != placeholder]
    return runs if len(runs) == count else None


ItemPrompts = Dict[str, Tuple[Tuple[int, ...], ...]]
"""{modality: one tuple of prompt token ids per item}."""


def item_prompt_ids(ids: Sequence[int], placeholders: Mapping[str, int],
                    counts: Mapping[str, int], layout: Optional[ChatLayout], prompt: str,
                    inserted: Optional["re.Pattern"] = None) -> ItemPrompts:
    """Each item's prompt token ids, per modality, decided by ``prompt_positions``.

    Args:
        ids: the request's prompt token ids; placeholders: {modality: its placeholder token
            id}; counts: {modality: number of items}; layout, prompt, inserted: as
            ``prompt_positions``.
    """
    ids = [int(i) for i in ids]
    counts = {m: n for m, n in counts.items() if n > 0}
    special = set(placeholders.values()) | (layout.added_ids if layout is not None else set())
    if prompt == "message" and all(i in special for i in ids):
        # no words at all (vLLM's profiling prompts): nothing to parse, an empty prompt
        return {m: ((),) * n for m, n in counts.items()}
    starts = {m: placeholder_starts(ids, placeholders[m], n) for m, n in counts.items()}
    if any(s is None for s in starts.values()):
        prompt = "all"  # items not located: every text token, for each of them
        starts = {m: [0] * n for m, n in counts.items()}
    flat = [p for m in counts for p in starts[m]]
    positions = iter(prompt_positions(ids, flat, list(placeholders.values()), layout, prompt,
                                      inserted))
    return {m: tuple(tuple(ids[p] for p in next(positions)) for _ in range(n))
            for m, n in counts.items()}


def _without_prompts(kwargs: Mapping[str, object]) -> dict:
    return {k: v for k, v in kwargs.items() if k != PROMPT_KWARG}


class PromptAwareProcessor:
    """Mixin for a vLLM multimodal processor (listed before it): each item's prompt ids are
    computed in ``apply``, mixed into the item's hash and attached to the item as a field.

    A family sets ``placeholder_ids`` (and ``inserted_text`` if its processor writes text
    into the user's message: the regex of the Hugging Face wrapper's ``inserted_text``)."""

    inserted_text: Optional[str] = None

    def placeholder_ids(self) -> Dict[str, int]:
        """{modality: the placeholder token id that stands for an item in the prompt}."""
        raise NotImplementedError

    @cached_property
    def prompt_layout(self) -> Optional[ChatLayout]:
        """The chat layout of the served model's processor (its tokenizer's template else)."""
        return ChatLayout.of(self.info.get_hf_processor())

    @cached_property
    def prompt_mode(self) -> str:
        return prompt_setting(self.info.get_hf_config())

    def apply(self, inputs, timing_ctx):
        placeholders = self.placeholder_ids()
        counts = {m: len(inputs.mm_data_items[m]) for m in placeholders
                  if m in inputs.mm_data_items}
        inserted = re.compile(self.inserted_text) if self.inserted_text else None
        prompts = item_prompt_ids(inputs.prompt, placeholders, counts, self.prompt_layout,
                                  self.prompt_mode, inserted)
        kwargs = {**inputs.hf_processor_mm_kwargs, PROMPT_KWARG: prompts}
        return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs),
                             timing_ctx)

    def _get_mm_hashes(self, inputs):
        from vllm.multimodal.hasher import MultiModalHasher

        prompts = inputs.hf_processor_mm_kwargs.get(PROMPT_KWARG, {})
        hashes = dict(super()._get_mm_hashes(dataclasses.replace(
            inputs, hf_processor_mm_kwargs=_without_prompts(inputs.hf_processor_mm_kwargs))))
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        for modality, items in prompts.items():
            hashes[modality] = [MultiModalHasher.hash_kwargs(algorithm, mm_hash=mm_hash,
                                                             zspaprune_prompt=list(ids))
                                for mm_hash, ids in zip(hashes[modality], items)]
        return hashes

    def _get_cache_missing_processor_kwargs(self, inputs, mm_is_cached):
        prompts = inputs.hf_processor_mm_kwargs.get(PROMPT_KWARG, {})
        kwargs = super()._get_cache_missing_processor_kwargs(dataclasses.replace(
            inputs, hf_processor_mm_kwargs=_without_prompts(inputs.hf_processor_mm_kwargs)),
            mm_is_cached)
        missing = {m: tuple(ids for ids, hit in zip(items, mm_is_cached.get(m, ())) if not hit)
                   for m, items in prompts.items()}
        return {**kwargs, PROMPT_KWARG: missing}

    def _call_hf_processor(self, hf_data, hf_kwargs):
        return super()._call_hf_processor(hf_data, _without_prompts(hf_kwargs))

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(
            mm_inputs, _without_prompts(hf_processor_mm_kwargs), processed_data)
        for modality, items in hf_processor_mm_kwargs.get(PROMPT_KWARG, {}).items():
            if items:
                processed_data[PROMPT_FIELDS[modality]] = [
                    torch.tensor(ids, dtype=torch.int64) for ids in items]
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = super()._get_mm_fields_config(hf_inputs,
                                               _without_prompts(hf_processor_mm_kwargs))
        return {**fields, **{field: MultiModalFieldConfig.batched(modality)
                             for modality, field in PROMPT_FIELDS.items()
                             if modality in self.placeholder_ids()}}


def prompt_embeddings(language_model, prompt_ids: Sequence[torch.Tensor], device
                      ) -> List[torch.Tensor]:
    """Each item's prompt embeddings [T_i, D] from its prompt ids (int64 [T_i] each), by the
    language model's ``embed_input_ids``, in one call."""
    prompt_ids = [ids.to(device) for ids in prompt_ids]
    embeddings = language_model.embed_input_ids(torch.cat(prompt_ids))
    return list(embeddings.split([ids.numel() for ids in prompt_ids]))


def selection_recorder():
    """A deque keeping the last N selections when ``RECORD_ENV`` is N > 0, else None."""
    from collections import deque

    record = int(os.environ.get(RECORD_ENV, "0"))
    return deque(maxlen=record) if record > 0 else None


def recorded_selections(model) -> list:
    """The model's recorded selections, (prompt ids, kept positions) per item, newest last (for
    ``LLM.apply_model``); empty unless recording."""
    return list(getattr(model, "recorded_selections", None) or ())


__all__ = ["ItemPrompts", "PROMPT_FIELDS", "PROMPT_KWARG", "RECORD_ENV", "PromptAwareProcessor",
           "item_prompt_ids", "placeholder_starts", "prompt_embeddings", "prompt_setting",
           "pruning_config", "recorded_selections", "selection_recorder"]
