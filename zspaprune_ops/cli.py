"""The ``zspaprune`` command line: ``zspaprune select``, ``zspaprune demo`` and ``zspaprune eval``.

A mistake in the arguments ends in the subcommand's usage, one ``error:`` line naming the
option, and exit status 2; never a traceback.
"""
import argparse
import math
from pathlib import Path

import torch

from zspaprune_ops._validate import FEATURE_DTYPES
from zspaprune_ops.checkpoint import DEMO_PROMPT
from zspaprune_ops.choice import Budget
from zspaprune_ops.dispatch import BACKENDS
from zspaprune_ops.errors import UsageError, one_line_error

DEMO_OUT = "zspaprune_demo.png"
EVAL_METHODS = ("zspaprune", "random", "uniform")
EVAL_OUT = "zspaprune_eval.json"
EVAL_PLOT = "zspaprune_eval.png"
DEFAULT_BUDGETS = [0.5, 0.25, 0.1111, 0.05]
"""The demo's and eval's budgets: 50%, 25%, 11% (LLaVA's 64 of 576) and 5% of each image's
visual tokens (128, 64, 28 and 13 of the shapes world's 256)."""


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # False for NaN too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


BUDGET_HELP = ("an integer is visual tokens per image; a number in (0, 1] a share of each "
               "image's tokens, max(1, floor(share * N + 0.5)) of N (1.0 keeps it whole)")


def budget(text: str):
    """``--keep`` / ``--budgets``: an int (visual tokens per image, >= 1) or a float in (0, 1]
    (a share of each image's tokens), as ``zspaprune_ops.prune(keep=...)`` takes it: "64" is 64
    tokens, "0.25" and "1.0" are shares. ``zspaprune_ops.choice.Budget`` checks the value."""
    from zspaprune_ops.choice import Budget

    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a token count (an integer >= 1) or a share of each image's tokens (a "
                f"number in (0, 1]), got {text!r}") from None
        if value > 1 and value.is_integer():
            raise argparse.ArgumentTypeError(
                f"a share of each image's tokens must be in (0, 1], got {text!r}; for "
                f"{int(value)} tokens per image write {int(value)}")
    try:
        Budget(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"must be a token count (an integer >= 1) or a share of each image's tokens (a "
            f"number in (0, 1]), got {text!r}") from error
    return value


def device(text: str) -> torch.device:
    """A torch device that exists on this machine (a tensor can be made there)."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (e.g. cpu, cuda, cuda:1)") \
            from None
    if parsed.type == "meta":
        raise argparse.ArgumentTypeError("meta tensors hold no values: use cpu or cuda")
    try:
        torch.empty(0, device=parsed)
    except Exception as error:  # AssertionError (torch without CUDA) or RuntimeError (no GPU)
        raise argparse.ArgumentTypeError(f"{text} is not available here ({one_line_error(error)})") \
            from None
    return parsed


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def _select_command(args: argparse.Namespace) -> None:
    import zspaprune_ops
    from zspaprune_ops.choice import Budget
    from zspaprune_ops.dispatch import implementation
    from zspaprune_ops.testing.measure import median_seconds

    keep = Budget(args.keep).count(args.n)
    if keep > args.n:
        raise UsageError(f"--keep {args.keep} is above --n {args.n} (the tokens per image)")
    try:
        implementation(args.backend, args.device)
    except RuntimeError as error:  # the kernels on CPU without Triton's interpreter
        raise UsageError(f"--backend {args.backend}: {error}") from None
    generator = torch.Generator().manual_seed(args.seed)
    visual = torch.randn(args.batch, args.n, args.dim, generator=generator)
    prompt = torch.randn(args.batch, args.prompt_len, args.dim, generator=generator)
    visual = visual.to(args.device, FEATURE_DTYPES[args.dtype])
    prompt = prompt.to(args.device, FEATURE_DTYPES[args.dtype])

    def run():
        return zspaprune_ops.select(visual, prompt, keep, args.ratio, backend=args.backend)

    kept = run()  # also the warm-up: first-call compilation stays out of the timing
    median_ms = median_seconds(run, args.device, repeat=args.repeat, warmup=0) * 1e3
    for row in kept.tolist():
        print(" ".join(map(str, row)))
    print(f"kept {keep} of {args.n} tokens x {args.batch} image(s), D={args.dim}, "
          f"ratio={args.ratio}, {args.dtype} on {args.device} ({args.backend}): "
          f"median {median_ms:.3f} ms over {args.repeat} run(s)")


def _demo_command(args: argparse.Namespace):
    from zspaprune_ops import demo

    return demo.main(args)


def _eval_command(args: argparse.Namespace):
    from zspaprune_ops.eval import run

    return run.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zspaprune", description="ZSPAPrune visual-token pruning for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    sel = commands.add_parser("select", help="run the op on random tokens and time it",
                              description="Run zspaprune_ops.select on random features; print "
                                          "the kept indices (one row per image) and the time.")
    sel.add_argument("--n", type=positive_int, default=576,
                     help="visual tokens per image (default: %(default)s)")
    sel.add_argument("--dim", type=positive_int, default=4096,
                     help="feature size D (default: %(default)s)")
    sel.add_argument("--keep", type=budget, default=64,
                     help=f"tokens to keep per image, at most --n: {BUDGET_HELP} "
                          "(default: %(default)s)")
    sel.add_argument("--ratio", type=ratio, default=0.5,
                     help="relevance ratio in [0, 1] (default: %(default)s)")
    sel.add_argument("--batch", type=positive_int, default=1,
                     help="images B (default: %(default)s)")
    sel.add_argument("--prompt-len", type=non_negative_int, default=32,
                     help="prompt tokens T (default: %(default)s)")
    sel.add_argument("--seed", type=_int, default=0, help="random seed (default: %(default)s)")
    sel.add_argument("--dtype", choices=sorted(FEATURE_DTYPES), default="float32",
                     help="feature dtype (default: %(default)s)")
    sel.add_argument("--device", type=device, default="cpu",
                     help="torch device (default: %(default)s)")
    sel.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto: the op, fused kernels on CUDA and the reference elsewhere; "
                          "triton: the kernels (on CPU needs TRITON_INTERPRET=1); reference: "
                          "the pure-PyTorch reference (default: %(default)s)")
    sel.add_argument("--repeat", type=positive_int, default=5,
                     help="timed runs after a warm-up (default: %(default)s)")
    sel.set_defaults(run=_select_command, command_parser=sel)

    demo = commands.add_parser(
        "demo", help="prune a model at a few budgets: timings, memory, text, overlay PNG",
        description="Prune a model's visual tokens at a few budgets; print tokens kept, "
                    "prefill time, the language model's prefill memory and the generated text "
                    "against the unpruned model, and draw the kept patches. Runs offline on "
                    "the shipped shapes-world model and a scene of its world unless --model "
                    "is given.")
    _model_options(demo)
    demo.add_argument("--image", type=existing_path,
                      help="image file (default: a shapes-world scene for the default model, "
                           "the bundled sample picture with --model)")
    demo.add_argument("--prompt",
                      help="question (default: the default scene's question for the default "
                           f"model, {DEMO_PROMPT!r} with --model)")
    demo.add_argument("--keep", type=budget, nargs="+", default=DEFAULT_BUDGETS,
                      help=f"budgets, one row each: {BUDGET_HELP}; the default keeps 128 64 28 "
                           "13 of 256 tokens, 288 144 64 29 of 576 (default: %(default)s)")
    demo.add_argument("--ratio", type=ratio, default=Budget.relevance_ratio,
                      help="relevance ratio in [0, 1] (default: %(default)s)")
    demo.add_argument("--out", default=DEMO_OUT,
                      help="overlay image to write, .png or another format Pillow writes "
                           "(default: %(default)s)")
    demo.add_argument("--max-new-tokens", type=positive_int, default=12,
                      help="generated tokens (default: %(default)s)")
    demo.add_argument("--repeat", type=positive_int, default=5,
                      help="timed prefill runs per budget, after a warm-up (default: %(default)s)")
    demo.set_defaults(run=_demo_command, command_parser=demo)

    ev = commands.add_parser(
        "eval", help="answer accuracy against kept tokens, per selection method",
        description="Ask the same questions unpruned and at each budget with each selection "
                    "method (ZSPAPrune at several ratios, random, uniform spatial subsample); "
                    "print accuracy and agreement with the unpruned answer, write JSON rows and "
                    "a plot. Runs offline on the shipped shapes-world model and fresh questions "
                    "of its world unless --model / --data are given.")
    _model_options(ev)
    ev.add_argument("--data", type=existing_path,
                    help="JSONL file, one {\"image\", \"question\", \"answers\"} object per "
                         "line, image paths relative to the file (default: shapes-world "
                         "questions of --split)")
    ev.add_argument("--split", default="test",
                    help="shapes-world split: train, val, test, cluttered (more and smaller "
                         "objects, each question about one), cluttered-train, cluttered-val "
                         "or an integer seed (default: %(default)s)")
    ev.add_argument("--questions", type=positive_int,
                    help="questions to ask: the first N of --data (default: all) or N of the "
                         "shapes world (default: 200)")
    ev.add_argument("--methods", nargs="+", choices=EVAL_METHODS, default=list(EVAL_METHODS),
                    help="selection methods (default: %(default)s)")
    ev.add_argument("--ratios", type=ratio, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="ZSPAPrune relevance ratios, one method each; 0 is DivPrune, 1 "
                         "relevance only (default: %(default)s)")
    ev.add_argument("--budgets", type=budget, nargs="+", default=DEFAULT_BUDGETS,
                    help=f"budgets, one each: {BUDGET_HELP}; 0.1111 is LLaVA's 64 of 576 "
                         "(default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=positive_int, default=8,
                    help="generated tokens per answer (default: %(default)s)")
    ev.add_argument("--seed", type=_int, default=0,
                    help="seed of the random method (default: %(default)s)")
    ev.add_argument("--out", default=EVAL_OUT,
                    help="JSON rows to write (default: %(default)s)")
    ev.add_argument("--plot", default=EVAL_PLOT,
                    help="accuracy plot to write, .png (default: %(default)s)")
    ev.set_defaults(run=_eval_command, command_parser=ev)
    return parser


def _model_options(command) -> None:
    """--model, --device and --dtype: how the demo and eval load a model."""
    from zspaprune_ops.models import family_names

    command.add_argument("--model", type=existing_path,
                         help=f"local checkpoint folder of a supported family ({family_names()}) "
                              "(default: the shipped shapes-world model)")
    command.add_argument("--device", type=device,
                         help="torch device (default: cuda if available, else cpu)")
    command.add_argument("--dtype", choices=sorted(FEATURE_DTYPES),
                         help="model dtype (default: bfloat16 on cuda, float32 on cpu)")


def main(argv=None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the subcommand."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.run(args)
    except UsageError as error:
        args.command_parser.error(str(error))


if __name__ == "__main__":
    main()
