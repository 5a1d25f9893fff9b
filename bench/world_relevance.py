"""Where prompt relevance points in the shapes world: ``python bench/world_relevance.py``.

For the first ``--questions`` questions of each split that name an object in the scene (the
cluttered split: every question; the test split: all but "Is there a ...?" about an absent
shape), the relevance ranking of the shipped model's visual tokens (cosine of each projected
visual token to the mean input embedding of the prompt tokens: what the relevance core ranks
by, ``reference.naive.select`` at ``relevance_ratio=1``) is compared with the patches of the
named object, at each budget's ``keep``, for four prompts:

- ``all``: every text token (``prompt="all"``, the old default: the template's ``USER``,
  ``:``, ``ASSISTANT`` beside the question);
- ``message``: the user's words (``prompt="message"``, the default);
- ``named word``: the one word naming the object (a diagnostic, not an option: what a perfect
  mean over the question could give);
- ``every word``: the mean of all the world's word embeddings, no question at all (a control:
  where a ranking that does not depend on the question puts its picks).

Writes JSON rows (``"bench": "relevance_coverage"``, rendered by ``bench/results.py``) to
``--out`` and prints the word-alignment probe (``world.alignment``) per split: how close the
projected visual tokens lie to the word embeddings, the premise of the relevance core.
"""
import argparse
import json
import math
from pathlib import Path

import torch

from zspaprune_ops.checkpoint import load, prompt_text
from zspaprune_ops.eval.run import DEFAULT_FRACTIONS
from zspaprune_ops.choice import Budget
from zspaprune_ops.prompt import ChatLayout, prompt_positions
from zspaprune_ops.reference.naive import select
from zspaprune_ops.testing.measure import environment
from zspaprune_ops.world import scenes
from zspaprune_ops.world.alignment import word_alignment
from zspaprune_ops.world.model import WORDS, image_features

PROMPTS = ("all", "message", "named word", "every word")


def prompt_embeddings(model, processor, layout, ids: torch.Tensor, question: str, prompt: str):
    """The prompt's input embeddings [T, D] for ``ids`` [L] (one image)."""
    embed = model.get_input_embeddings()
    if prompt == "named word":
        word = question.rstrip("?").split()[-1]
        return embed(torch.tensor(processor.tokenizer.convert_tokens_to_ids([word])))
    if prompt == "every word":
        return embed(torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(WORDS))))
    image = model.config.image_token_id
    start = int((ids == image).nonzero()[0])
    positions = prompt_positions(ids, [start], [image], layout, prompt)[0]
    return embed(ids[positions])


def study(model, processor, split: str, count: int, keeps):
    """Rows' raw material for ``split``: per prompt and keep, per question a hit (0/1) and the
    share of the top-keep on the named object; per prompt the AUC; and the random baseline."""
    layout = ChatLayout.of(processor)
    hits = {(p, k): [] for p in PROMPTS for k in keeps}
    on_named = {(p, k): [] for p in PROMPTS for k in keeps}
    auc = {p: [] for p in PROMPTS}
    random_covered = {k: [] for k in keeps}
    dilution = []  # cosine of the user's words' mean embedding to the named word's
    index = 0
    while len(random_covered[keeps[0]]) < count:
        sample = scenes.sample(split, index)
        index += 1
        colours = scenes.patch_labels(sample.things)[1]
        target = scenes.named_patches(sample.things, sample.question, colours)
        if target is None:
            continue
        target = torch.tensor(target)
        background = torch.tensor(colours) == 0
        inputs = processor(images=sample.image, text=prompt_text(processor, sample.question),
                           return_tensors="pt")
        visual = image_features(model, inputs["pixel_values"])  # [N, D]
        n, m = len(visual), int(target.sum())
        means = {}
        for prompt in PROMPTS:
            prompt_rows = prompt_embeddings(model, processor, layout, inputs["input_ids"][0],
                                            sample.question, prompt)
            means[prompt] = prompt_rows.mean(0)
            scores = torch.nn.functional.cosine_similarity(
                visual, prompt_rows.mean(0, keepdim=True), dim=-1)
            named, rest = scores[target], scores[background]
            auc[prompt].append(((named[:, None] > rest[None]).float().mean()
                                + 0.5 * (named[:, None] == rest[None]).float().mean()).item())
            for keep in keeps:
                top = select(visual, prompt_rows, keep, relevance_ratio=1.0)
                hits[prompt, keep].append(int(target[top].any()))
                on_named[prompt, keep].append(target[top].float().mean().item())
        for keep in keeps:
            random_covered[keep].append(1 - math.comb(n - m, keep) / math.comb(n, keep))
        dilution.append(torch.nn.functional.cosine_similarity(
            means["message"], means["named word"], dim=0).item())
    return hits, on_named, auc, random_covered, sum(dilution) / len(dilution)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=500,
                        help="questions naming an object, per split (default: %(default)s)")
    parser.add_argument("--splits", nargs="+", default=["test", "cluttered"])
    parser.add_argument("--model", default=None,
                        help="a shapes-world checkpoint folder (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON rows to write (default: none, print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load(args.model, torch.device("cpu"), torch.float32)
    n = model.config.image_seq_length
    keeps = [Budget(f).count(n) for f in DEFAULT_FRACTIONS]
    rows, env = [], environment(torch.device("cpu"))
    with torch.no_grad():
        for split in args.splits:
            share, cosines = word_alignment(model, processor, scenes.samples(split, 64))
            print(f"{split}: object patches whose nearest word embedding is their colour or "
                  f"shape {share:.1%}; mean cosine to their colour word {cosines['colour']:.3f}, "
                  f"shape word {cosines['shape']:.3f}, other colour words "
                  f"{cosines['other colour']:.3f}")
            hits, on_named, auc, random_covered, dilution = study(
                model, processor, split, args.questions, keeps)
            print(f"{split}: cosine of the question's mean word embedding to its named word's "
                  f"{dilution:.3f}")
            data = f"shapes-world {split} (seed {scenes.split_seed(split)})"
            name = "shapes-world LLaVA (shipped)" if args.model is None else Path(args.model).name
            shape = {"model": name, "data": data,
                     "questions": args.questions, "N": n}
            for (prompt, keep), outcome in hits.items():
                fraction = DEFAULT_FRACTIONS[keeps.index(keep)]
                rows.append({"bench": "relevance_coverage",
                             "shape": {**shape, "budget": round(fraction, 4)}, "impl": prompt,
                             "prompt": prompt, "keep": keep,
                             "covered": sum(outcome) / len(outcome),
                             "on_named": sum(on_named[prompt, keep]) / len(outcome),
                             "random_covered": sum(random_covered[keep]) / len(outcome),
                             "auc": sum(auc[prompt]) / len(auc[prompt]),
                             "hits": "".join(map(str, outcome)),
                             "word_alignment": {"nearest_is_own_word": share, **cosines},
                             "question_mean_to_named_word": dilution, **env})
                print(f"{split} keep {keep:3d} prompt {prompt:10s}: covers the named object in "
                      f"{rows[-1]['covered']:.1%} (random {rows[-1]['random_covered']:.1%}), "
                      f"{rows[-1]['on_named']:.1%} of the picks on it, AUC {rows[-1]['auc']:.3f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
