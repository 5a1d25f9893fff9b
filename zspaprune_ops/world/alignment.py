"""How close the shapes-world model puts its projected visual tokens to its word embeddings:
the premise of prompt relevance (cosine of visual tokens to the prompt's mean embedding)."""
from typing import Dict, Sequence, Tuple

import torch

from zspaprune_ops.world import scenes
from zspaprune_ops.world.model import WORDS, image_features


def word_alignment(model, processor, samples: Sequence[scenes.Sample]
                   ) -> Tuple[float, Dict[str, float]]:
    """Over the object patches of ``samples`` (``scenes.patch_labels``): the share whose
    nearest word embedding by cosine, among the world's ``WORDS``, is the object's colour or
    shape word; and the mean cosine of a patch's visual token to its colour word, its shape
    word, and the other colour words (``"colour"``, ``"shape"``, ``"other colour"``)."""
    tokenizer = processor.tokenizer
    words = torch.tensor(tokenizer.convert_tokens_to_ids(list(WORDS)))
    embeddings = torch.nn.functional.normalize(
        model.get_input_embeddings().weight[words].float(), dim=-1)  # [W, D]
    colour_rows = [WORDS.index(c) for c in scenes.COLOURS]
    shape_rows = [WORDS.index(s) for s in scenes.SHAPES]
    pixels = processor.image_processor([s.image for s in samples],
                                       return_tensors="pt")["pixel_values"]
    visual = image_features(model, pixels.to(model.dtype)).float()
    visual = torch.nn.functional.normalize(visual, dim=-1).reshape(len(samples), -1,
                                                                   visual.shape[-1])  # [S, N, D]
    hits = total = 0
    sums = {"colour": 0.0, "shape": 0.0, "other colour": 0.0}
    for sample, tokens in zip(samples, visual):
        shapes, colours = (torch.tensor(labels) for labels in scenes.patch_labels(sample.things))
        on = colours > 0
        cosine = tokens[on] @ embeddings.T  # [P, W]
        colour = torch.tensor(colour_rows)[colours[on] - 1]
        shape = torch.tensor(shape_rows)[shapes[on] - 1]
        nearest = cosine.argmax(-1)
        hits += int(((nearest == colour) | (nearest == shape)).sum())
        total += int(on.sum())
        rows = torch.arange(len(cosine))
        sums["colour"] += float(cosine[rows, colour].sum())
        sums["shape"] += float(cosine[rows, shape].sum())
        others = cosine[:, colour_rows].sum(-1) - cosine[rows, colour]
        sums["other colour"] += float(others.sum()) / (len(colour_rows) - 1)
    return hits / max(1, total), {key: value / max(1, total) for key, value in sums.items()}
