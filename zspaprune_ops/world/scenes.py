"""The shapes world: scenes of a few coloured shapes on a cluttered background, with templated
single-word questions. Deterministic: ``sample(split, index)`` is the same picture and question
on every machine.

A scene is a 224x224 RGB image (16x16 patches of 14 px: 256 visual tokens) on a light
background tinted and speckled at random, with 4-8 thin grey clutter strokes. Two layouts:

- standard: 2 or 3 objects of distinct shapes (circle, square, triangle, cross) and distinct
  colours (red, green, blue, yellow, purple), each 48-76 px wide (4-5 patches); questions of
  three kinds equally often:

  - ``What color is the <shape>?`` -> a colour (the shape is in the scene);
  - ``Which shape is <colour>?`` -> a shape (the colour is in the scene);
  - ``Is there a <shape>?`` -> ``yes`` / ``no`` (half each);

- cluttered: 4 or 5 smaller objects, 30-44 px (2-3 patches), distinct colours, shapes drawn
  with repeats; every question is about one object: ``What color is the <shape>?`` for a shape
  the scene holds once, or ``Which shape is <colour>?``, half each (a colour question becomes
  a shape question where no shape is alone). There prompt-awareness is
  supposed to pay: the named object is a small part of a busy picture.

Every answer is one word and one token of the world's tokenizer. Chance accuracy, answering
at random among the words the question's kind allows: 1/5, 1/4 and 1/2, i.e. 0.32 on average
(0.225 on the cluttered layout). Splits differ by seed: ``train`` (seed 0), ``val`` (1),
``test`` (2) are standard; ``cluttered-train`` (10), ``cluttered-val`` (11) and ``cluttered``
(12, the cluttered test split) are cluttered; any other integer seed gives further fresh
standard questions.
"""
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
PATCH_SIZE = 14
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle", "cross")
SPLITS = {"train": 0, "val": 1, "test": 2, "cluttered-train": 10, "cluttered-val": 11,
          "cluttered": 12}
CLUTTERED = frozenset({"cluttered-train", "cluttered-val", "cluttered"})
"""The splits of the cluttered layout."""
KINDS = ("color", "shape", "exists")
ANSWERS = {"color": tuple(COLOURS), "shape": SHAPES, "exists": ("yes", "no")}


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    box: Tuple[int, int, int, int]  # left, top, right, bottom (pixels, exclusive)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    things: Tuple[Thing, ...]


def split_seed(split) -> int:
    """The seed of a split name (``train``/``val``/``test``) or an integer seed itself."""
    if isinstance(split, int) and not isinstance(split, bool):
        return split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)} or an integer seed, got {split!r}")
    return SPLITS[split]


def sample(split, index: int) -> Sample:
    """Sample ``index`` of ``split``: a scene and one question about it."""
    seed = split_seed(split)
    if split in CLUTTERED:
        rng = random.Random(f"shapes-world/cluttered/{seed}/{index}")
        things = _place(rng, rng.choice((4, 5)), (30, 44), repeat_shapes=True)
    else:
        rng = random.Random(f"shapes-world/{seed}/{index}")
        things = _place(rng, rng.choice((2, 3)), (48, 76), repeat_shapes=False)
    image = _draw(rng, things)
    kind = (KINDS[rng.randrange(2)] if split in CLUTTERED else KINDS[rng.randrange(len(KINDS))])
    if kind == "color" and not _unique_shapes(things):
        kind = "shape"  # every shape twice: "What color is the <shape>?" would be ambiguous
    if kind == "color":
        thing = rng.choice(_unique_shapes(things))
        question, answer = f"What color is the {thing.shape}?", thing.colour
    elif kind == "shape":
        thing = rng.choice(things)
        question, answer = f"Which shape is {thing.colour}?", thing.shape
    else:
        present = sorted({t.shape for t in things})
        absent = [s for s in SHAPES if s not in present]
        answer = "yes" if rng.random() < 0.5 else "no"
        shape = rng.choice(present if answer == "yes" else absent)
        question = f"Is there a {shape}?"
    return Sample(image, question, answer, kind, tuple(things))


def all_questions(things) -> List[Tuple[str, str, str]]:
    """Every question the world asks about a scene of ``things``: (kind, question, answer); a
    colour question only for a shape the scene holds once."""
    present = {t.shape for t in things}
    return ([("color", f"What color is the {t.shape}?", t.colour) for t in _unique_shapes(things)]
            + [("shape", f"Which shape is {t.colour}?", t.shape) for t in things]
            + [("exists", f"Is there a {shape}?", "yes" if shape in present else "no")
               for shape in SHAPES])


def patch_labels(things, min_pixels: int = 20) -> Tuple[List[int], List[int]]:
    """Per patch (raster order, 256 of them): (shape, colour) of the thing covering most of it,
    as 1 + the index in ``SHAPES`` / ``COLOURS``; 0 where no thing covers ``min_pixels``."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for index, thing in enumerate(things):
        _draw_thing(draw, thing, fill=index + 1)
    side = IMAGE_SIZE // PATCH_SIZE
    owner = np.asarray(mask).reshape(side, PATCH_SIZE, side, PATCH_SIZE).transpose(0, 2, 1, 3)
    counts = np.stack([(owner == k).sum(axis=(2, 3)) for k in range(1, len(things) + 1)])
    best = counts.argmax(0).reshape(-1)  # the first thing on ties, as before
    covered = counts.max(0).reshape(-1) >= min_pixels
    shapes = [1 + SHAPES.index(things[k].shape) if on else 0 for k, on in zip(best, covered)]
    colours = [1 + list(COLOURS).index(things[k].colour) if on else 0
               for k, on in zip(best, covered)]
    return shapes, colours


def named_patches(things, question: str, colours: List[int]) -> Optional[List[bool]]:
    """Which patches (``patch_labels``' ``colours``: a scene's colours are distinct) show the
    things ``question`` names by its last word, a shape or a colour; None when no thing in
    ``things`` has that name."""
    word = question.rstrip("?").split()[-1]
    named = {1 + list(COLOURS).index(t.colour) for t in things if word in (t.shape, t.colour)}
    if not named:
        return None
    return [label in named for label in colours]


def caption(things) -> str:
    """The scene in words, objects in reading order (by the top, then the left of their box):
    ``a red circle a blue square``. The feature-alignment stage of training (``train.py``)
    teaches the projector to make the frozen language model say it."""
    ordered = sorted(things, key=lambda t: (t.box[1] // PATCH_SIZE, t.box[0]))
    return " ".join(f"a {t.colour} {t.shape}" for t in ordered)


def _unique_shapes(things) -> List[Thing]:
    shapes = [t.shape for t in things]
    return [t for t in things if shapes.count(t.shape) == 1]


def samples(split, count: int, start: int = 0) -> List[Sample]:
    return [sample(split, i) for i in range(start, start + count)]


def _place(rng: random.Random, count: int, sizes: Tuple[int, int],
           repeat_shapes: bool) -> List[Thing]:
    shapes = ([rng.choice(SHAPES) for _ in range(count)] if repeat_shapes
              else rng.sample(SHAPES, count))
    colours = rng.sample(list(COLOURS), len(shapes))
    things: List[Thing] = []
    while len(things) < len(shapes):
        size = rng.randint(*sizes)
        left, top = rng.randint(4, IMAGE_SIZE - size - 4), rng.randint(4, IMAGE_SIZE - size - 4)
        box = (left, top, left + size, top + size)
        if all(_apart(box, other.box) for other in things):
            things.append(Thing(shapes[len(things)], colours[len(things)], box))
    return things


def _apart(a, b, gap: int = 6) -> bool:
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1]
            or b[3] + gap <= a[1])


def _draw(rng: random.Random, things: List[Thing]) -> Image.Image:
    base = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), base)
    draw = ImageDraw.Draw(image)
    for _ in range(400):  # speckle
        x, y = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        shade = rng.randint(-25, 25)
        draw.point((x, y), fill=tuple(max(0, min(255, c + shade)) for c in base))
    for _ in range(rng.randint(4, 8)):  # clutter strokes
        x, y = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        grey = rng.randint(90, 170)
        draw.line((x, y, x + rng.randint(-30, 30), y + rng.randint(-30, 30)),
                  fill=(grey, grey, grey), width=2)
    for thing in things:
        _draw_thing(draw, thing)
    return image


def _draw_thing(draw: ImageDraw.ImageDraw, thing: Thing, fill=None) -> None:
    left, top, right, bottom = thing.box
    right, bottom = right - 1, bottom - 1
    fill = COLOURS[thing.colour] if fill is None else fill
    if thing.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif thing.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    else:  # cross: two bars a third of the size wide
        third = (right - left) / 3
        draw.rectangle((left + third, top, right - third, bottom), fill=fill)
        draw.rectangle((left, top + third, right, bottom - third), fill=fill)
