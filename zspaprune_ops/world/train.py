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
import time
from pathlib import Path

import torch

from zspaprune_ops.world import scenes
from zspaprune_ops.world.model import SHIPPED_MODEL, build_model, build_processor, chat_prompt


def batch_inputs(processor, batch, with_answers: bool = True) -> dict:
    """Processor inputs for world samples; with answers, ``labels`` mark the answer and ``</s>``
    (everything else -100). Right-padded."""
    tokenizer = processor.tokenizer
    texts = [chat_prompt(s.question) + (f" {s.answer}</s>" if with_answers else "")
             for s in batch]
    inputs = processor(images=[s.image for s in batch], text=texts, return_tensors="pt",
                       padding=True)
    if with_answers:
        ids = inputs["input_ids"]
        colon = tokenizer.convert_tokens_to_ids(":")
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        last_colon = torch.where(ids == colon, positions, -1).max(dim=1, keepdim=True).values
        answer = (positions > last_colon) & (inputs["attention_mask"] == 1)
        inputs["labels"] = ids.masked_fill(~answer, -100)
    return inputs


def answer_accuracy(model, processor, batch) -> float:
    """Share of ``batch`` whose answer token is the model's top next token (teacher-forced)."""
    inputs = batch_inputs(processor, batch)
    labels = inputs.pop("labels")
    with torch.no_grad():
        logits = model(**inputs).logits
    first = (labels != -100).int().argmax(dim=1)  # the answer's position
    rows = torch.arange(len(batch))
    return (logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().mean().item()


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 50):
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
        loss = model(**batch_inputs(processor, batch)).loss
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
    parser.add_argument("--log-every", type=int, default=50,
                        help="steps between log lines (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, _, seconds = train(args.out, args.steps, args.batch, args.lr, args.seed,
                          args.log_every)
    print(f"trained {args.steps} steps x {args.batch} in {seconds / 60:.1f} min; "
          f"saved to {args.out}")


if __name__ == "__main__":
    main()
