"""Train the shapes world's LLaVA: ``python -m zspaprune_ops.world.train``.

Two stages, AdamW, each with a linear warm-up then cosine decay. Stage 1 trains the vision
tower and projector alone on training-only patch heads (``PatchHeads``): a from-scratch tower
learns colours in a few dozen steps but shapes only after a few hundred, and until it sees
shapes the language model can only learn the answer prior. Stage 2 trains every weight on
cross-entropy of the answer tokens and their ``</s>``, plus the patch heads, plus a grounding
loss (``grounding_loss``) that points one attention head of the last layer at the object the
question names: in 300-step trials without it the two-layer language model stayed at guessing
from the bag of colours and shapes in the scene. Each step draws the next fresh batch of the
train split, so no scene repeats; each scene is a multi-turn conversation of its own question
and ``--turns - 1`` other questions about it. Seeded (weights, data; reproducing the shipped
weights bit for bit was not checked); the shipped model was trained with the defaults below
under ``torch.set_num_threads(1)`` in 28.5 min on a 2-core CPU shared with other work (stage
1: 6.2 min, stage 2: 22.3 min). Saves fp16 weights, tokenizer and processor with
``save_pretrained``; the heads are not saved.
"""
import argparse
import math
import random
import time
from pathlib import Path

import torch

from zspaprune_ops.world import scenes
from zspaprune_ops.world.model import SHIPPED_MODEL, build_model, build_processor, chat_prompt


def dialogue(sample: scenes.Sample, turns: int, seed: str):
    """The (question, answer) turns of ``sample``'s training conversation: its own question
    first, then ``turns - 1`` other questions about the same scene."""
    others = [(q, a) for _, q, a in scenes.all_questions(sample.things) if q != sample.question]
    extra = random.Random(seed).sample(others, min(turns - 1, len(others)))
    return [(sample.question, sample.answer), *extra]


def conversation(sample: scenes.Sample, turns: int, seed: str) -> str:
    """The training text of ``sample``: ``dialogue(...)`` in LLaVA's multi-turn format, each
    answer ended by ``</s>``. Several answers per image give several learning signals for one
    pass of the vision tower."""
    (question, answer), *extra = dialogue(sample, turns, seed)
    text = f"{chat_prompt(question)} {answer}</s>"
    return text + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in extra)


def grounding_loss(attention: torch.Tensor, inputs: dict, batch, turns: int, seed: str,
                   image_token_id: int, eos_token_id: int) -> torch.Tensor:
    """-log of the attention mass that head 0 of ``attention`` (a layer's [B, H, T, T]) puts,
    from each position that predicts an answer, on the visual tokens of the object the
    question names (none for a "no"). Teaches the language model to look the named object up
    rather than guess from the bag of things in the scene."""
    labels = inputs["labels"]
    losses = []
    for b, sample in enumerate(batch):
        shapes = scenes.patch_labels(sample.things)[0]
        visual = (inputs["input_ids"][b] == image_token_id).nonzero().squeeze(1)
        answers = ((labels[b] != -100) & (labels[b] != eos_token_id)).nonzero().squeeze(1)
        for position, (question, _) in zip(answers - 1, dialogue(sample, turns, f"{seed}/{b}")):
            named = scenes.named_patches(sample.things, question, shapes)
            if named is not None:
                target = visual[torch.tensor(named)]
                losses.append(-torch.log(attention[b, 0, position, target].sum() + 1e-6))
    return torch.stack(losses).mean() if losses else attention.new_zeros(())


def batch_inputs(processor, batch, turns: int = 1, seed: str = "") -> dict:
    """Processor inputs for world samples (right-padded) with ``labels``: every answer token
    and ``</s>`` of ``conversation(...)``, everything else -100."""
    tokenizer = processor.tokenizer
    texts = [conversation(s, turns, f"{seed}/{i}") for i, s in enumerate(batch)]
    inputs = processor(images=[s.image for s in batch], text=texts, return_tensors="pt",
                       padding=True)
    ids = inputs["input_ids"]
    colon, assistant = tokenizer.convert_tokens_to_ids([":", "ASSISTANT"])
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 2:] = (ids[:, 1:-1] == colon) & (ids[:, :-2] == assistant)
    answer |= ids == tokenizer.eos_token_id
    inputs["labels"] = ids.masked_fill(~answer, -100)
    return inputs


def answer_accuracy(model, processor, batch) -> float:
    """Share of ``batch`` whose answer token is the model's top next token (teacher-forced)."""
    inputs = batch_inputs(processor, batch)
    labels = inputs.pop("labels")
    with torch.no_grad():
        logits = model(**inputs).logits
    first = (labels != -100).int().argmax(dim=1)  # the (first) answer's position
    rows = torch.arange(len(batch))
    return (logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().mean().item()


class PatchHeads(torch.nn.Module):
    """Training-only linear heads on the projected visual tokens [B, N, D], labelled by
    ``scenes.patch_labels``: each patch's colour (class 0 = no thing), each object patch's
    shape, and each object's shape from the mean of its patches. Dense supervision teaches the
    from-scratch vision tower what the scene holds far faster than one answer per question.
    Colour is local to a patch and learnt in a few dozen steps; shape is not (a patch inside a
    square looks like one inside a circle). The per-object mean lets the edge patches vote: in a
    vision-only trial with it, per-patch shape accuracy left chance after about 250 steps (without
    it, still at chance after 200; longer was not tried). The heads are not saved (the shipped
    model is a plain LLaVA)."""

    def __init__(self, dim: int):
        super().__init__()
        self.shape = torch.nn.Linear(dim, 1 + len(scenes.SHAPES))
        self.colour = torch.nn.Linear(dim, 1 + len(scenes.COLOURS))
        self.object_shape = torch.nn.Linear(dim, len(scenes.SHAPES))

    def loss(self, visual: torch.Tensor, batch) -> torch.Tensor:
        labels = [scenes.patch_labels(s.things) for s in batch]
        shapes = torch.tensor([shape for shape, _ in labels])  # [B, N]
        colours = torch.tensor([colour for _, colour in labels])
        visual = visual.reshape(*shapes.shape, -1).float()  # [B, N, D]
        cross_entropy = torch.nn.functional.cross_entropy
        patch = (cross_entropy(self.colour(visual).flatten(0, 1), colours.flatten())
                 + cross_entropy(self.shape(visual).flatten(0, 1),
                                 shapes.masked_fill(shapes == 0, -100).flatten()))
        # objects have distinct colours within a scene: one object per non-zero colour label
        members = torch.nn.functional.one_hot(colours, 1 + len(scenes.COLOURS))[..., 1:].float()
        counts = members.sum(1)  # [B, C]
        means = torch.einsum("bnc,bnd->bcd", members, visual) / counts.clamp(min=1)[..., None]
        object_shapes = (members * shapes[..., None]).amax(1).long()  # [B, C], 0 = absent
        present = counts > 0
        return patch + cross_entropy(self.object_shape(means[present]),
                                     object_shapes[present] - 1)


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected visual tokens of ``pixel_values``: [B * N, D]."""
    features = model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True).pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    return features.reshape(-1, features.shape[-1])


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, turns: int,
          patch_weight: float, grounding_weight: float, vision_steps: int = 0,
          log_every: int = 50):
    """Stage 1 (``vision_steps``): the vision tower and projector alone on the patch heads'
    loss, so that the tower sees shapes before the language model learns to read them. Stage 2
    (``steps``): every weight, on the answer loss plus ``patch_weight`` times the patch loss
    plus ``grounding_weight`` times ``grounding_loss`` of the last layer. Each stage has its own
    warm-up and cosine decay; every step draws the next ``batch_size`` scenes of the train
    split."""
    processor = build_processor()
    model = build_model(seed)
    model.train()
    model.set_attn_implementation("eager")  # the grounding loss reads attention probabilities
    torch.manual_seed(seed)
    heads = PatchHeads(model.config.text_config.hidden_size)
    projected = []  # the projector's output of the current step: [B * N, D]
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: projected.append(output))
    vision = [*model.model.vision_tower.parameters(),
              *model.model.multi_modal_projector.parameters(), *heads.parameters()]
    stages = (("vision step", vision_steps, vision),
              ("step", steps, [*model.parameters(), *heads.parameters()]))
    ids = (model.config.image_token_id, processor.tokenizer.eos_token_id)
    start, drawn = time.time(), 0
    for name, count, parameters in stages:
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(count))
        running = []
        for step in range(count):
            batch = scenes.samples("train", batch_size, start=drawn)
            drawn += batch_size
            projected.clear()
            if name == "vision step":
                pixels = processor.image_processor([s.image for s in batch],
                                                   return_tensors="pt")["pixel_values"]
                losses = {"patch": heads.loss(image_features(model, pixels), batch)}
            else:
                inputs = batch_inputs(processor, batch, turns, f"{seed}/{step}")
                output = model(**inputs, output_attentions=True)
                losses = {"answer": output.loss,
                          "patch": patch_weight * heads.loss(projected[0], batch),
                          "grounding": grounding_weight * grounding_loss(
                              output.attentions[-1], inputs, batch, turns, f"{seed}/{step}", *ids)}
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            lr_schedule.step()
            running.append({key: loss.item() for key, loss in losses.items()})
            if (step + 1) % log_every == 0 or step + 1 == count:
                line = f"{name} {step + 1}/{count} loss" + "".join(
                    f" {key} {sum(r[key] for r in running) / len(running):.4f}" for key in losses)
                if name == "step":
                    model.eval()
                    accuracy = answer_accuracy(model, processor, scenes.samples("val", 48))
                    model.train()
                    line += f" val accuracy {accuracy:.2f} (48 questions)"
                print(f"{line} {time.time() - start:.0f} s", flush=True)
                running = []
    hook.remove()
    model.eval()
    model.set_attn_implementation("sdpa")
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    return model.float(), processor, time.time() - start


def _schedule(steps: int):
    """Linear warm-up over the first 5% of ``steps``, then cosine decay to 0."""
    warmup = max(1, steps // 20)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return schedule


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL,
                        help="folder to save the model in (default: %(default)s)")
    parser.add_argument("--vision-steps", type=int, default=800,
                        help="stage 1: steps training the vision tower and projector alone on "
                             "the patch heads (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1000,
                        help="stage 2: steps training every weight (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--turns", type=int, default=8,
                        help="questions per training image, as a multi-turn conversation "
                             "(default: %(default)s)")
    parser.add_argument("--patch-weight", type=float, default=1.0,
                        help="weight of the per-patch shape/colour loss, 0 for none "
                             "(default: %(default)s)")
    parser.add_argument("--grounding-weight", type=float, default=1.0,
                        help="weight of the grounding loss (attention on the named object), "
                             "0 for none (default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=50,
                        help="steps between log lines (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, _, seconds = train(args.out, args.steps, args.batch, args.lr, args.seed, args.turns,
                          args.patch_weight, args.grounding_weight, args.vision_steps,
                          args.log_every)
    print(f"trained {args.vision_steps} + {args.steps} steps x {args.batch} in "
          f"{seconds / 60:.1f} min; saved to {args.out}")


if __name__ == "__main__":
    main()
