"""Which tokens form each image's relevance prompt: the one home of that decision, for the
Hugging Face wrappers and the vLLM plugin alike.

``prompt="message"`` (the default): an image's prompt is the text of the user message that
holds it: the user's own words, without the system prompt, the chat template's role markers
and special tokens, the image/video placeholders and their markers, other turns or assistant
text. Images of one message share its text; an image outside every user message (in a system
or assistant message) gets an empty prompt, so pure diversity. ``prompt="all"``: every real
text token of the sequence but the image/video placeholders (the behaviour before 0.2, for
comparison). An explicit ``prompt_mask`` always wins over both.

Finding the user's words needs the chat template and the tokenizer (``ChatLayout``): the
token ids are decoded to text, the tokens that the template never writes (image placeholders
and markers, a BOS the tokenizer adds) are set aside, and the text is matched against the
template rendered with sentinel messages, for growing conversations (an optional system
message, alternating user and assistant turns, with or without the generation prompt) until
one matches whole. A token belongs to a user message when it carries a non-blank character of
that message's text; a byte-level or SentencePiece token that glues the template's space onto
the user's first word counts as the user's. Without a tokenizer, or when the text matches no
conversation of the template (hand-written prompts), ``"message"`` falls back to ``"all"`` and
says so in a warning (shown once per place by Python's default warning filter).
"""
import functools
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

PROMPT_MODES = ("message", "all")
MAX_TURNS = 64
"""The longest conversation (user messages) tried before a text is declared unparsable."""
_SENTINEL = "ZSPQ{}QZSP"
_ENDINGS = ("generation", "user", "assistant", "continue")
"""How a conversation may end: a user turn and the generation prompt (the usual inference
prompt), a user turn alone, a complete assistant turn, an assistant turn being continued."""


def check_prompt_mode(prompt: str) -> str:
    if prompt not in PROMPT_MODES:
        raise ValueError(f"prompt must be one of {PROMPT_MODES}, got {prompt!r}")
    return prompt


def _warn(message: str) -> None:
    # Python's default warning filter shows a message once per place: once for a user's loop
    warnings.warn(message, UserWarning, stacklevel=3)


@dataclass(frozen=True)
class _Skeleton:
    """A conversation shape rendered with sentinel texts: a regex that matches a chat of that
    shape whole, its capture groups being the messages' texts, and each group's role."""

    pattern: "re.Pattern"
    roles: Tuple[str, ...]
    glue_length: int


class ChatLayout:
    """The user messages in token ids that ``tokenizer`` made from ``chat_template``'s output.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode``, ``added_tokens_decoder``; a processor's
            ``.tokenizer``).
        chat_template: the Jinja chat template text the prompts were rendered with.
    """

    def __init__(self, tokenizer, chat_template: str):
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ValueError("chat_template must be a non-empty Jinja template string")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._skeletons: Dict[tuple, Optional[_Skeleton]] = {}
        added = {int(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()}
        rendered = "".join(self._render(system, 2, ending) or ""
                           for system in (False, True) for ending in _ENDINGS)
        self.added_ids = frozenset(added)
        texts = sorted(set(added.values()), key=len, reverse=True)
        self._split_added = re.compile("(" + "|".join(map(re.escape, texts)) + r")|\s+" if texts
                                       else r"\s+")
        # added tokens the template writes itself (role markers...): part of the text matched;
        # the others (image placeholders and markers, a BOS added by the tokenizer) are set aside
        self.foreign_ids = frozenset(i for i, text in added.items() if text not in rendered)

    @classmethod
    def of(cls, source) -> Optional["ChatLayout"]:
        """The layout of a processor or tokenizer (its ``chat_template``; a processor's own
        template wins over its tokenizer's); None when it has no template."""
        if source is None:
            return None
        tokenizer = getattr(source, "tokenizer", source)
        template = getattr(source, "chat_template", None) or getattr(tokenizer, "chat_template",
                                                                   None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        return cls(tokenizer, template) if isinstance(template, str) and template else None

    # ------------------------------------------------------------------ parsing
    def user_messages(self, ids: Sequence[int], inserted: Optional["re.Pattern"] = None
                      ) -> Optional[List[int]]:
        """Per token of ``ids`` (one sequence, no padding): the index (0, 1, ...) of the user
        message whose text holds it, or -1 (template, system, assistant, or a set-aside token
        outside every user message). Set-aside tokens (placeholders) take the message they sit
        in. ``inserted``: text a processor writes into the message beside its images (Qwen3-VL's
        ``<1.0 seconds>``), which is not the user's: a token with no other non-blank character
        takes -1. None when the text is no conversation of this template."""
        ids = [int(i) for i in ids]
        kept = [p for p, i in enumerate(ids) if i not in self.foreign_ids]
        text, spans = self._text_and_spans([ids[p] for p in kept])
        found = self._match(text)
        if found is None:
            return None
        words = text
        if inserted is not None:  # blank out the processor's text: it never counts
            words = inserted.sub(lambda match: " " * len(match.group()), text)
        messages = [-1] * len(ids)
        for k, p in enumerate(kept):
            start, end = spans[k]
            for m, (c0, c1) in enumerate(found):
                if words[max(start, c0):min(end, c1)].strip():
                    messages[p] = m
                    break
        # a set-aside token sits at the offset where the previous kept token ends; the blanks
        # around a message's text (which the loose template text may have taken) count as its
        found = [(len(text[:c0].rstrip()), c1 + len(text[c1:]) - len(text[c1:].lstrip()))
                 for c0, c1 in found]
        offset, k = 0, 0
        for p, i in enumerate(ids):
            if k < len(kept) and kept[k] == p:
                offset = spans[k][1]
                k += 1
                continue
            messages[p] = next((m for m, (c0, c1) in enumerate(found) if c0 <= offset <= c1), -1)
        return messages

    def _text_and_spans(self, ids: List[int]) -> Tuple[str, List[Tuple[int, int]]]:
        """The decoded text of ``ids`` and each token's character span in it."""
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
        text = decode(ids)
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if list(encoded["input_ids"]) == ids:
                return text, [tuple(span) for span in encoded["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError):  # slow tokenizers: no offsets
            pass
        # Each token's text in the context of a few tokens before it (a SentencePiece token's
        # leading space and a byte-level token's half of a character depend on them), checked
        # against the whole; else the exact, quadratic prefix lengths.
        window = 8
        pieces = [decode(ids[max(0, k - window):k + 1])[len(decode(ids[max(0, k - window):k])):]
                  for k in range(len(ids))]
        if "".join(pieces) == text:
            lengths = [len(piece) for piece in pieces]
        else:
            ends = [len(decode(ids[:k + 1])) for k in range(len(ids))]
            lengths = [end - start for start, end in zip([0] + ends[:-1], ends)]
        spans, start = [], 0
        for length in lengths:
            spans.append((start, start + max(0, length)))
            start += max(0, length)
        return text, spans

    def _match(self, text: str) -> Optional[List[Tuple[int, int]]]:
        """Character spans of the user messages' texts, in order; None if no shape matches.

        A template that writes the system text into the first user turn (Gemma 3) matches a
        chat both with and without a system message: the split with a system message wins
        unless it leaves a user message without words (then the system text was the user's)."""
        for turns in range(1, MAX_TURNS + 1):
            shortest, found = None, []
            for system in (True, False):
                for ending in _ENDINGS:
                    skeleton = self._skeleton(system, turns, ending)
                    if skeleton is None:
                        continue
                    shortest = min(shortest or skeleton.glue_length, skeleton.glue_length)
                    match = skeleton.pattern.fullmatch(text)
                    if match is not None:
                        found.append([match.span(g + 1) for g, role in enumerate(skeleton.roles)
                                      if role == "user"])
                        break  # the other endings of this shape cannot match too
            for spans in found:
                if all(text[a:b].strip() for a, b in spans):
                    return spans
            if found:
                return found[0]
            if shortest is not None and shortest > len(text):
                break  # longer conversations' template text alone is longer than the text
        return None

    def _skeleton(self, system: bool, turns: int, ending: str) -> Optional[_Skeleton]:
        key = (system, turns, ending)
        if key not in self._skeletons:
            self._skeletons[key] = self._build_skeleton(system, turns, ending)
        return self._skeletons[key]

    def _build_skeleton(self, system: bool, turns: int, ending: str) -> Optional[_Skeleton]:
        roles = _roles(system, turns, ending)
        rendered = self._render(system, turns, ending)
        if rendered is None:
            return None
        glue, rest = [], rendered
        for k in range(len(roles)):
            head, sep, rest = rest.partition(_SENTINEL.format(k))
            if not sep:
                return None  # the template dropped or altered a message: not this shape
            glue.append(head)
        glue.append(rest)
        # a message's text never holds the template's own text: so a shorter conversation cannot
        # match a longer chat by swallowing turns into one message
        marks = sorted({self._glue_core(g) for g in glue if len(g.strip()) >= 2}, key=len,
                       reverse=True)
        forbidden = "|".join(marks)
        content = f"((?:(?!{forbidden}).)*?)" if forbidden else "(.*?)"
        pattern = self._glue_pattern(glue[0]) + "".join(content + self._glue_pattern(g)
                                                        for g in glue[1:])
        return _Skeleton(re.compile(pattern, re.DOTALL), roles, sum(map(len, glue)))

    def _glue_pattern(self, glue: str) -> str:
        """A regex for the template's text between two messages. Its spaces are loose, and
        loose around added tokens (a legacy SentencePiece tokenizer decodes a space after every
        special token, so a decoded chat differs from the rendered one in whitespace); text of
        spaces alone stays exact, so that it still separates two messages."""
        if not glue.strip():
            return re.escape(glue)
        return r"\s*" + self._glue_core(glue) + r"\s*"

    def _glue_core(self, glue: str) -> str:
        parts = [part for part in self._split_added.split(glue) if part and part.strip()]
        return r"\s*".join(map(re.escape, parts))

    def _render(self, system: bool, turns: int, ending: str) -> Optional[str]:
        """The template's text for a conversation of sentinel messages; None if the template
        refuses that shape."""
        roles = _roles(system, turns, ending)
        for typed in (True, False):
            messages = [{"role": role, "content": [{"type": "text", "text": _SENTINEL.format(k)}]
                         if typed else _SENTINEL.format(k)} for k, role in enumerate(roles)]
            try:
                rendered = self.tokenizer.apply_chat_template(
                    messages, chat_template=self.chat_template, tokenize=False,
                    add_generation_prompt=ending == "generation",
                    continue_final_message=ending == "continue")
            except Exception:  # noqa: BLE001 - templates raise what they like for shapes they refuse
                continue
            if isinstance(rendered, str):
                return rendered
        return None


def _roles(system: bool, turns: int, ending: str) -> Tuple[str, ...]:
    roles = ["system"] if system else []
    for turn in range(turns):
        roles.append("user")
        if turn < turns - 1 or ending in ("assistant", "continue"):
            roles.append("assistant")
    return tuple(roles)


def prompt_positions(ids: Sequence[int], items: Sequence[int], placeholder_ids,
                     layout: Optional[ChatLayout], prompt: str = "message",
                     inserted: Optional["re.Pattern"] = None) -> List[List[int]]:
    """The positions of each item's relevance prompt in one sequence.

    Args:
        ids: the sequence's token ids, without padding (a list or an int64 [L] tensor).
        items: per visual item, the position of its first placeholder token in ``ids``.
        placeholder_ids: the image/video placeholder token ids (never prompt tokens).
        layout: the chat layout, or None (no tokenizer: ``"message"`` falls back to ``"all"``).
        prompt: ``"message"`` or ``"all"`` (see the module docstring).
        inserted: a regex of the text the model's processor writes into a user message beside
            its images (a family's ``inserted_text``); never the user's words.
    Returns:
        per item, ascending positions into ``ids`` (possibly none).
    """
    check_prompt_mode(prompt)
    ids = [int(i) for i in ids]
    placeholders = {int(i) for i in placeholder_ids}
    messages = None
    if prompt == "message":
        if layout is None:
            _warn("zspaprune: no tokenizer with a chat template was given, so the relevance "
                  "prompt is every real text token (prompt='all'), not the user's message; "
                  "pass processor=... (or prompt='all' to silence this)")
        else:
            messages = layout.user_messages(ids, inserted)
            if messages is None:
                _warn("zspaprune: a prompt does not match its chat template (written by "
                      "hand?), so its relevance prompt is every real text token "
                      "(prompt='all') instead of the user's message")
    if messages is None:
        everything = [p for p, i in enumerate(ids) if i not in placeholders]
        return [everything for _ in items]
    special = layout.added_ids | placeholders
    words: Dict[int, List[int]] = {}
    for p, (i, m) in enumerate(zip(ids, messages)):
        if m >= 0 and i not in special:
            words.setdefault(m, []).append(p)
    return [words.get(messages[start], []) if messages[start] >= 0 else [] for start in items]


__all__ = ["PROMPT_MODES", "ChatLayout", "check_prompt_mode", "prompt_positions"]
