"""The ``zspaprune`` command line."""
import argparse

import torch

from zspaprune_ops import demo
from zspaprune_ops._validate import FEATURE_DTYPES
from zspaprune_ops.dispatch import BACKENDS
from zspaprune_ops.measure import median_seconds


def _select_command(args: argparse.Namespace) -> None:
    import zspaprune_ops

    generator = torch.Generator().manual_seed(args.seed)
    visual = torch.randn(args.batch, args.n, args.dim, generator=generator)
    prompt = torch.randn(args.batch, args.prompt_len, args.dim, generator=generator)
    device = torch.device(args.device)
    visual = visual.to(device, FEATURE_DTYPES[args.dtype])
    prompt = prompt.to(device, FEATURE_DTYPES[args.dtype])

    def run():
        return zspaprune_ops.select(visual, prompt, args.keep, args.ratio, backend=args.backend)

    kept = run()  # also the warm-up: first-call compilation stays out of the timing
    median_ms = median_seconds(run, device, repeat=args.repeat, warmup=0) * 1e3
    for row in kept.tolist():
        print(" ".join(map(str, row)))
    print(f"kept {args.keep} of {args.n} tokens x {args.batch} image(s), D={args.dim}, "
          f"ratio={args.ratio}, {args.dtype} on {device} ({args.backend}): "
          f"median {median_ms:.3f} ms over {args.repeat} run(s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zspaprune", description="ZSPAPrune visual-token pruning for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    sel = commands.add_parser("select", help="run the op on random tokens and time it",
                              description="Run zspaprune_ops.select on random features; print "
                                          "the kept indices (one row per image) and the time.")
    sel.add_argument("--n", type=int, default=576, help="visual tokens per image (576)")
    sel.add_argument("--dim", type=int, default=4096, help="feature size D (4096)")
    sel.add_argument("--keep", type=int, default=64, help="tokens to keep per image (64)")
    sel.add_argument("--ratio", type=float, default=0.5, help="relevance ratio in [0, 1] (0.5)")
    sel.add_argument("--batch", type=int, default=1, help="images B (1)")
    sel.add_argument("--prompt-len", type=int, default=32, help="prompt tokens T (32)")
    sel.add_argument("--seed", type=int, default=0, help="random seed (0)")
    sel.add_argument("--dtype", choices=sorted(FEATURE_DTYPES), default="float32")
    sel.add_argument("--device", default="cpu", help="torch device (cpu)")
    sel.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto (default): the op, fused kernels on CUDA and the reference "
                          "elsewhere; triton: the kernels (on CPU needs TRITON_INTERPRET=1); "
                          "reference: the pure-PyTorch reference")
    sel.add_argument("--repeat", type=int, default=5, help="timed runs after a warm-up (5)")
    sel.set_defaults(run=_select_command)
    demo.add_parser(commands)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        if args.command != "select":
            raise
        parser.error(str(error))  # e.g. --keep above --n: the op's message, as a usage error


if __name__ == "__main__":
    main()
