"""Train the shapes world's LLaVA: ``python -m zspaprune_ops.world.train``.

One stage, every weight trained together (a from-scratch vision tower has nothing for a
projector-only stage to align): AdamW, linear warm-up then cosine decay, cross-entropy on the
answer tokens and their ``</s>`` only. Each step draws a fresh batch of the train split (sample
``step * batch + i``), so no scene repeats; each scene is a multi-turn conversation of its own
question and ``--turns - 1`` other questions about it. Seeded (weights, data, thinning
draws; reproducing the shipped weights bit for bit was not checked); the shipped model was
trained with the defaults below under ``torch.set_num_threads(1)`` (11.1 min on a shared
2-core CPU). Saves fp16 weights, tokenizer and processor with
``save_pretrained``.
"""
import argparse
import math
import random
import time
from pathlib import Path

import torch

from zspaprune_ops.world import scenes
from zspaprune_ops.world.model import SHIPPED_MODEL, build_model, build_processor, chat_prompt


def conversation(sample: scenes.Sample, turns: int, seed: str) -> str:
    """The training text of ``sample``: its own question first, then ``turns - 1`` other
    questions about the same scene (LLaVA's multi-turn format), each answer ended by ``</s>``.
    Several answers per image give several learning signals for one pass of the vision tower."""
    others = [(q, a) for _, q, a in scenes.all_questions(sample.things) if q != sample.question]
    extra = random.Random(seed).sample(others, min(turns - 1, len(others)))
    text = f"{chat_prompt(sample.question)} {sample.answer}</s>"
    return text + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in extra)


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
    """Training-only linear heads on the projected visual tokens [B, N, D]: each patch's shape
    and colour (``scenes.patch_labels``, class 0 = no thing). Dense supervision teaches the
    from-scratch vision tower what the scene holds far faster than one answer per question;
    the heads are not saved (the shipped model is a plain LLaVA)."""

    def __init__(self, dim: int):
        super().__init__()
        self.shape = torch.nn.Linear(dim, 1 + len(scenes.SHAPES))
        self.colour = torch.nn.Linear(dim, 1 + len(scenes.COLOURS))

    def loss(self, visual: torch.Tensor, batch) -> torch.Tensor:
        labels = [scenes.patch_labels(s.things) for s in batch]
        shapes = torch.tensor([shape for shape, _ in labels]).flatten()
        colours = torch.tensor([colour for _, colour in labels]).flatten()
        visual = visual.reshape(len(shapes), -1)
        cross_entropy = torch.nn.functional.cross_entropy
        return cross_entropy(self.shape(visual), shapes) + cross_entropy(self.colour(visual),
                                                                          colours)


def thinned_loss(model, inputs: dict, batch, keep_background: float,
                 generator: torch.Generator) -> torch.Tensor:
    """The answer loss with each image reduced to its object patches and a random
    ``keep_background`` share of the others (text tokens all kept, positions contiguous, as
    after pruning). Early in training this shortens the haystack the language model must
    search, so it learns to attend to the named object instead of the question-kind prior."""
    ids, labels = inputs["input_ids"], inputs["labels"]
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True).pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    embeds = model.get_input_embeddings()(ids)
    image = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(image[..., None], features.reshape(-1, embeds.shape[-1]))
    objects = torch.tensor([scenes.patch_labels(s.things)[0] for s in batch]) > 0
    chosen = objects | (torch.rand(objects.shape, generator=generator) < keep_background)
    keep = ~image & (inputs["attention_mask"] == 1)
    keep[image] = chosen.flatten()
    length = int(keep.sum(1).max())
    rows = [keep_row.nonzero().squeeze(1) for keep_row in keep]
    pad = lambda x, value: torch.stack([  # noqa: E731
        torch.cat([x[b, r], x.new_full((length - len(r), *x.shape[2:]), value)])
        for b, r in enumerate(rows)])
    mask = torch.stack([torch.arange(length) < len(r) for r in rows]).long()
    return model(inputs_embeds=pad(embeds, 0.0), attention_mask=mask,
                 labels=pad(labels, -100)).loss


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, turns: int,
          patch_weight: float, thin_steps: int = 0, keep_background: float = 0.15,
          log_every: int = 50):
    processor = build_processor()
    model = build_model(seed)
    model.train()
    torch.manual_seed(seed)
    heads = PatchHeads(model.config.text_config.hidden_size)
    projected = []  # the projector's output of the current step: [B * N, D]
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: projected.append(output))
    parameters = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start, running = time.time(), []
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = scenes.samples("train", batch_size, start=step * batch_size)
        projected.clear()
        inputs = batch_inputs(processor, batch, turns, f"{seed}/{step}")
        if step < thin_steps:
            loss = thinned_loss(model, inputs, batch, keep_background, generator)
        else:
            loss = model(**inputs).loss
        patch_loss = heads.loss(projected[0], batch)
        optimizer.zero_grad(set_to_none=True)
        (loss + patch_weight * patch_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        running.append((loss.item(), patch_loss.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            accuracy = answer_accuracy(model, processor, scenes.samples("val", 48))
            model.train()
            answer_loss, patch_loss = (sum(r[i] for r in running) / len(running) for i in (0, 1))
            print(f"step {step + 1}/{steps} loss {answer_loss:.4f} patch loss {patch_loss:.4f} "
                  f"val accuracy {accuracy:.2f} (48 questions) {time.time() - start:.0f} s",
                  flush=True)
            running = []
    hook.remove()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    return model.float(), processor, time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL,
                        help="folder to save the model in (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=700, help="(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--turns", type=int, default=5,
                        help="questions per training image, as a multi-turn conversation "
                             "(default: %(default)s)")
    parser.add_argument("--patch-weight", type=float, default=1.0,
                        help="weight of the per-patch shape/colour loss, 0 for none "
                             "(default: %(default)s)")
    parser.add_argument("--thin-steps", type=int, default=350,
                        help="first steps trained on thinned images: object patches plus "
                             "--keep-background of the others (default: %(default)s)")
    parser.add_argument("--keep-background", type=float, default=0.15,
                        help="(default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=50,
                        help="steps between log lines (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, _, seconds = train(args.out, args.steps, args.batch, args.lr, args.seed,
                          args.turns, args.patch_weight, args.thin_steps,
                          args.keep_background, args.log_every)
    print(f"trained {args.steps} steps x {args.batch} in {seconds / 60:.1f} min; "
          f"saved to {args.out}")


if __name__ == "__main__":
    main()
