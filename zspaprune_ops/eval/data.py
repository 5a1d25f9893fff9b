"""The questions ``zspaprune eval`` asks: the shapes world's, or a JSONL file's.

A JSONL file has one JSON object per line: ``{"image": "photo.jpg", "question": "What is the
man holding?", "answers": ["umbrella"]}`` (``"answer": "umbrella"`` also works). A relative
image path is relative to the file's folder. Blank lines are skipped.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Tuple

from PIL import Image


class DataError(ValueError):
    """A dataset file that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Question:
    load_image: Callable[[], Image.Image]
    question: str
    answers: Tuple[str, ...]


def world_questions(split, count: int) -> List[Question]:
    """``count`` questions of the shapes world's ``split`` (a name or an integer seed)."""
    from zspaprune_ops.world import scenes

    questions = []
    for index in range(count):
        sample = scenes.sample(split, index)
        questions.append(Question(lambda image=sample.image: image, sample.question,
                                  (sample.answer,)))
    return questions


def jsonl_questions(path) -> List[Question]:
    """The questions of a JSONL file, every line checked (images opened) before any is asked.
    Raises ``DataError`` naming the file and line of the first bad one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not readable as UTF-8 text ({error})") from None
    questions = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            questions.append(_parse_line(path, number, line))
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def _parse_line(path: Path, number: int, line: str) -> Question:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    answers = record.get("answers", record.get("answer"))
    answers = [answers] if isinstance(answers, str) else answers
    for key, value in (("image", record.get("image")), ("question", record.get("question"))):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: {key!r} must be a non-empty string")
    if not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: 'answers' must be a string or a non-empty list of strings")
    image = path.parent / record["image"]
    try:
        with Image.open(image) as opened:
            opened.verify()
    except (OSError, SyntaxError) as error:
        reason = "not found" if not image.exists() else f"not an image Pillow reads ({error})"
        raise DataError(f"{where}: image {image}: {reason}") from None
    return Question(lambda: Image.open(image).convert("RGB"), record["question"], tuple(answers))


def normalize(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the dropped, spaces collapsed."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(word for word in words if word not in ("a", "an", "the"))
