"""Where prompt relevance points in the shapes world: ``python bench/world_relevance.py``.

For test-split questions, the ``keep`` visual tokens of the shipped model with the highest
relevance (cosine of each projected visual token to the mean input embedding of the prompt's
text tokens, as the relevance core ranks them) are compared with the patches of the object the
question names, and with the top ``keep`` for another question about the same image. Prints
shares; ``bench/NOTES.md`` quotes them.
"""
import argparse

import torch

from zspaprune_ops.checkpoint import load, prompt_text
from zspaprune_ops.reference.naive import select
from zspaprune_ops.world import scenes
from zspaprune_ops.world.model import image_features


def top_relevance(model, processor, image, question: str, keep: int) -> torch.Tensor:
    """Indices [keep] of the relevance core at ``relevance_ratio=1``: the rule's own selection
    (the reference) on the visual tokens and the prompt's text-token embeddings."""
    inputs = processor(images=image, text=prompt_text(processor, question), return_tensors="pt")
    with torch.no_grad():
        visual = image_features(model, inputs["pixel_values"])  # [N, D]
        ids = inputs["input_ids"][0]
        prompt = model.get_input_embeddings()(ids)[ids != model.config.image_token_id]
        return select(visual, prompt, keep, relevance_ratio=1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--keep", type=int, default=28)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load(None, torch.device("cpu"), torch.float32)
    on_objects = covered = on_named = named_cover = overlap = 0.0
    named = missed = 0
    for index in range(args.questions):
        sample = scenes.sample("test", index)
        top = top_relevance(model, processor, sample.image, sample.question, args.keep)
        other = next(q for _, q, _ in scenes.all_questions(sample.things) if q != sample.question)
        other_top = top_relevance(model, processor, sample.image, other, args.keep)
        overlap += len(set(top.tolist()) & set(other_top.tolist())) / args.keep
        labels = scenes.patch_labels(sample.things)[0]
        shapes = torch.tensor(labels)
        on_objects += (shapes[top] > 0).float().mean().item()
        covered += (shapes > 0).float().mean().item()
        target = scenes.named_patches(sample.things, sample.question, labels)
        if target is not None:
            target = torch.tensor(target)
            named += 1
            missed += int(target[top].sum() == 0)
            on_named += target[top].float().mean().item()
            named_cover += target.float().mean().item()
    n = args.questions
    print(f"top {args.keep} by prompt relevance over {n} test questions: on objects "
          f"{on_objects / n:.1%} (objects cover {covered / n:.1%} of the patches); on the named "
          f"object {on_named / named:.1%} (it covers {named_cover / named:.1%}) over the {named} "
          f"questions naming a present object, none on it in {missed}; shared with the top "
          f"{args.keep} for another question about the same image: {overlap / n:.1%}")


if __name__ == "__main__":
    main()
