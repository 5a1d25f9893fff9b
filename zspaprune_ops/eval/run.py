"""The evaluation loop of ``zspaprune eval`` and its JSON rows.

Every question is asked once unpruned and once per (method, budget), greedy decoding. An answer
is correct when, normalized (``data.normalize``), it equals one of the question's normalized
answers; it agrees when it equals the unpruned model's normalized answer. A budget is what
``zspaprune_ops.prune(keep=...)`` takes (``choice.Budget``): an int is a token count per image, a
float in (0, 1] a share of each image's N visual tokens; a budget of N or more tokens keeps
the image whole (the unpruned answer).
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from zspaprune_ops.choice import Budget
from zspaprune_ops.eval.data import Question, normalize
from zspaprune_ops.eval.methods import Method

DEFAULT_FRACTIONS = (0.5, 0.25, 1 / 9, 0.05)
"""50%, 25%, 11% (LLaVA's 64 of 576) and 5% of the visual tokens."""
DEFAULT_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Tally:
    correct: int = 0
    agree: int = 0
    asked: int = 0
    kept: List[int] = field(default_factory=list)
    right: List[bool] = field(default_factory=list)  # per question, in order: for paired tests

    def add(self, answer: str, truths: Tuple[str, ...], unpruned: str, keep: int) -> None:
        self.right.append(answer in truths)
        self.correct += answer in truths
        self.agree += answer == unpruned
        self.asked += 1
        self.kept.append(keep)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval (95% by default) of a binomial proportion."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate(model, processor, questions: Sequence[Question], methods: Sequence[Method],
             budgets: Sequence[Union[int, float]], max_new_tokens: int, device: torch.device,
             seed: int = 0, progress: Optional[Callable[[int], None]] = None):
    """Ask every question unpruned and per (method, budget). Returns (tallies, unpruned
    tally): tallies maps (method, budget) to a ``Tally``."""
    from zspaprune_ops.checkpoint import prompt_text

    generator = torch.Generator().manual_seed(seed)
    dtype = model.get_input_embeddings().weight.dtype
    tallies: Dict[tuple, Tally] = {(m, b): Tally() for m in methods for b in budgets}
    unpruned_tally, wrappers = Tally(), {}
    decode = processor.tokenizer.decode
    for index, question in enumerate(questions):
        inputs = processor(images=question.load_image(),
                           text=prompt_text(processor, question.question), return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                  for k, v in inputs.items()}
        length = inputs["input_ids"].shape[1]
        n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
        options = dict(max_new_tokens=max_new_tokens, do_sample=False)
        with torch.inference_mode():
            unpruned = normalize(decode(model.generate(**inputs, **options)[0, length:],
                                        skip_special_tokens=True))
        truths = tuple(normalize(a) for a in question.answers)
        unpruned_tally.add(unpruned, truths, unpruned, n_image)
        for method in methods:
            for budget in budgets:
                keep = Budget(budget).count(n_image)
                if keep >= n_image:
                    tallies[method, budget].add(unpruned, truths, unpruned, n_image)
                    continue
                key = (method, keep)
                if key not in wrappers:
                    wrappers[key] = method.wrap(model, keep, generator, processor)
                with torch.inference_mode():
                    answer = decode(wrappers[key].generate(**inputs, **options)[0, length:],
                                    skip_special_tokens=True)
                tallies[method, budget].add(normalize(answer), truths, unpruned, keep)
        if progress is not None:
            progress(index + 1)
    return tallies, unpruned_tally


def rows(tallies: dict, unpruned: Tally, model_name: str, data_name: str) -> List[dict]:
    """JSON rows (``bench/results.py``'s format, ``"bench": "accuracy"``): the unpruned model
    first, then one per (method, budget)."""
    shape = {"model": model_name, "data": data_name, "questions": unpruned.asked,
             "N": _mean(unpruned.kept)}
    out = [_row(shape, "unpruned", None, 1.0, unpruned)]
    for (method, budget), tally in tallies.items():
        out.append(_row(shape, method.name, method, budget, tally))
    return out


def _row(shape: dict, impl: str, method: Optional[Method], budget, tally: Tally):
    low, high = wilson_interval(tally.correct, tally.asked)
    return {"bench": "accuracy", "shape": {**shape, "budget": round(budget, 4)},
            "impl": impl, "ratio": method.ratio if method else None,
            "method": method.label if method else "unpruned", "keep": _mean(tally.kept),
            "accuracy": tally.correct / max(1, tally.asked), "correct": tally.correct,
            "ci95": [low, high], "agreement": tally.agree / max(1, tally.asked),
            "agree": tally.agree, "right": "".join("01"[r] for r in tally.right)}


def _mean(values: List[int]) -> float:
    return round(sum(values) / max(1, len(values)), 2)


def main(args) -> List[dict]:
    """``zspaprune eval`` for parsed ``args``: prints the table, writes the rows and the plot,
    returns the rows. Raises UsageError for unusable arguments."""
    import json
    import sys
    from pathlib import Path

    from zspaprune_ops._validate import FEATURE_DTYPES
    from zspaprune_ops.checkpoint import load_model
    from zspaprune_ops.errors import UsageError
    from zspaprune_ops.eval import data, report
    from zspaprune_ops.eval.methods import Method
    from zspaprune_ops.testing.measure import environment

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = FEATURE_DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot {args.plot}: give a .png file name")
    if args.data is not None:
        try:
            questions = data.jsonl_questions(args.data)[:args.questions]
        except data.DataError as error:
            raise UsageError(f"--data {error}") from None
        data_name = Path(args.data).name
    else:
        from zspaprune_ops.world.scenes import split_seed

        split = int(args.split) if args.split.lstrip("-").isdigit() else args.split
        try:
            seed = split_seed(split)
        except ValueError as error:
            raise UsageError(f"--split {error}") from None
        questions = data.world_questions(split, args.questions or 200)
        data_name = f"shapes-world {args.split} (seed {seed})"
    model, processor = load_model(args.model, device, dtype)
    methods = [Method("zspaprune", r) for r in dict.fromkeys(args.ratios)
               if "zspaprune" in args.methods]
    methods += [Method(name) for name in dict.fromkeys(args.methods) if name != "zspaprune"]
    budgets = list(dict.fromkeys(args.budgets))

    def progress(done):
        if done % 25 == 0 or done == len(questions):
            print(f"  {done}/{len(questions)} questions", file=sys.stderr, flush=True)

    tallies, unpruned = evaluate(model, processor, questions, methods, budgets,
                                 args.max_new_tokens, device, args.seed, progress)
    model_name = "shapes-world LLaVA (shipped)" if args.model is None else Path(args.model).name
    env = environment(device)
    result = [{**row, **env} for row in rows(tallies, unpruned, model_name, data_name)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    report.plot(result, f"{model_name} on {data_name}: accuracy vs kept tokens").save(args.plot)
    print(report.table(result))
    print(f"rows: {args.out}; plot: {args.plot}")
    return result
