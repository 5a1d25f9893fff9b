"""Train the shapes world's LLaVA: ``python -m zspaprune_ops.world.train``.

One stage, every weight trained together (a from-scratch vision tower has nothing for a
projector-only stage to align): AdamW, linear warm-up then cosine decay, cross-entropy on the
answer token and the end-of-sequence token only. Each step draws a fresh batch of the train
split (sample ``step * batch + i``), so no question repeats. Deterministic for a seed on a given
torch build and thread count; the shipped model was trained with the defaults below under
``torch.set_num_threads(1)``. Saves fp16 weights, tokenizer and processor with
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


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, turns: int,
          log_every: int = 50):
    processor = build_processor()
    model = build_model(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start, running = time.time(), []
    for step in range(steps):
        batch = scenes.samples("train", batch_size, start=step * batch_size)
        loss = model(**batch_inputs(processor, batch, turns, f"{seed}/{step}")).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            accuracy = answer_accuracy(model, processor, scenes.samples("val", 48))
            model.train()
            print(f"step {step + 1}/{steps} loss {sum(running) / len(running):.4f} "
                  f"val accuracy {accuracy:.2f} (48 questions) {time.time() - start:.0f} s",
                  flush=True)
            running = []
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    return model.float(), processor, time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL,
                        help="folder to save the model in (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=800, help="(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--turns", type=int, default=5,
                        help="questions per training image, as a multi-turn conversation "
                             "(default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=50,
                        help="steps between log lines (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, _, seconds = train(args.out, args.steps, args.batch, args.lr, args.seed,
                          args.turns, args.log_every)
    print(f"trained {args.steps} steps x {args.batch} in {seconds / 60:.1f} min; "
          f"saved to {args.out}")


if __name__ == "__main__":
    main()
