"""GPU checks of the fused op that the test suite does not cover: one script, few device calls.

    python bench/gpu_check.py correct    # the compact correctness set of bench/gpu_session.sh
    python bench/gpu_check.py sweep      # fused vs reference on fresh random inputs, many shapes
    python bench/gpu_check.py contend    # cooperative path beside other work: 2 streams, a busy GPU
    python bench/gpu_check.py graphs     # CUDA-graph replay, torch.compile modes, no graph break
    python bench/gpu_check.py launches   # a few small launches of every kernel path (for
                                         # compute-sanitizer memcheck / racecheck / synccheck)
    python bench/gpu_check.py profile    # per-kernel device time at the benchmark shapes
    python bench/gpu_check.py modes      # Gram vs streaming launch 2 around N = 4096, and the
                                         # streaming passes against the model's

Every check prints one line per case ending in ``ok`` or ``FAIL: why``; the exit status is 1
if any case failed. A row that differs from the reference passes only as a genuine float64
near-tie (``tests/literal.replay``).

``--dry-run`` runs ``correct``, ``graphs`` and ``launches`` on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``) at tiny shapes, the cooperative launch with its programs as threads
(``zspaprune_ops.testing.interpreter``); what needs CUDA (streams, graphs, reduce-overhead) is
skipped and says so. It checks the script, not the GPU.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import zspaprune_ops  # noqa: E402
from literal import replay  # noqa: E402
from zspaprune_ops.kernels import fill as kfill  # noqa: E402
from zspaprune_ops.kernels import select as kselect  # noqa: E402
from zspaprune_ops.reference.naive import select_batched as reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAILURES = []
DEVICE = "cuda"
"""Where inputs live: "cpu" with --dry-run."""
REPLAY_MAX_N = 8192
"""Differing rows are replayed in float64 on the CPU up to this N (its DivPrune start builds
an N x N matrix); larger differing rows count as failures."""
REPLAY_ROWS = 3
"""Differing rows replayed per case (a float64 replay at N = 8192 takes seconds)."""


def report(name, error=None):
    print(f"{name}: {'ok' if error is None else 'FAIL: ' + error}", flush=True)
    if error is not None:
        FAILURES.append(name)


def make_inputs(seed, B, N, D, T, dtype, masks, clustered=False, device=None):
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    if clustered:  # few centres plus small noise: many near-duplicates, hard near-ties
        centres = torch.randn(B, 16, D, generator=g, device=device)
        which = torch.randint(0, 16, (B, N), generator=g, device=device)
        visual = centres.gather(1, which[..., None].expand(-1, -1, D))
        visual += 0.05 * torch.randn(B, N, D, generator=g, device=device)
    else:
        visual = torch.randn(B, N, D, generator=g, device=device)
    prompt = torch.randn(B, T, D, generator=g, device=device)
    prompt_mask = visual_mask = None
    if masks:
        prompt_mask = torch.rand(B, T, generator=g, device=device) < 0.5
        prompt_mask[0] = False  # one row without a real prompt token: DivPrune start
        visual_mask = torch.rand(B, N, generator=g, device=device) < 0.8
        visual_mask[:, : N // 2] = True
    return visual.to(dtype), prompt.to(dtype), prompt_mask, visual_mask


def compare(name, args, kept=None):
    """Fused (or ``kept``) vs the reference; differing rows must be float64 near-ties."""
    visual, prompt, keep, ratio, prompt_mask, visual_mask = args
    if kept is None:
        kept = kselect.select_batched(*args)
    expected = reference(*args)
    if kept.shape != expected.shape or kept.dtype != torch.int64:
        return report(name, f"shape/dtype {tuple(kept.shape)} {kept.dtype}")
    bad = torch.nonzero((kept != expected).any(dim=1)).flatten().tolist()
    if (kept < 0).any() or (kept >= visual.shape[1]).any():
        return report(name, f"indices outside [0, N): rows {bad[:8]}")
    N = visual.shape[1]
    for b in bad[:REPLAY_ROWS]:
        if N > REPLAY_MAX_N:
            return report(name, f"{len(bad)} rows differ (N too large to replay)")
        try:
            replay(visual[b].cpu(), prompt[b].cpu(), keep, ratio, kept[b].cpu(),
                   None if prompt_mask is None else prompt_mask[b].cpu(),
                   None if visual_mask is None else visual_mask[b].cpu())
        except AssertionError as error:
            return report(name, f"row {b}: {str(error)[:300]}")
    report(name + (f" ({len(bad)} differing rows, {min(len(bad), REPLAY_ROWS)} replayed as "
                   "near-ties)" if bad else ""))


def skipped(name, why):
    print(f"{name}: SKIPPED ({why})", flush=True)


CORRECT = [  # B, N, D, T, keep, gram, parts (None: automatic), dtypes, masks, ratios
    (1, 576, 4096, 32, 64, None, None, "bf16,fp16,fp32", (False, True), (0.0, 0.5, 1.0)),
    (3, 577, 4096, 650, 192, False, None, "bf16", (True,), (0.0, 0.5, 1.0)),
    (64, 576, 4096, 512, 64, None, None, "bf16", (True,), (0.5,)),
    (2, 2880, 4096, 64, 288, None, None, "bf16,fp32", (False, True), (0.0, 0.5, 1.0)),
    (2, 8192, 4096, 32, 819, False, 2, "bf16", (True,), (0.0, 0.5)),
    (2, 8192, 4096, 32, 819, False, 3, "fp16", (False,), (0.5, 1.0)),
    (2, 8192, 4096, 32, 819, False, None, "bf16,fp16,fp32", (False, True), (0.0, 0.5, 1.0)),
    (1, 32768, 4096, 32, 3277, False, None, "bf16", (False,), (0.5,)),
]
"""The compact set of ``correct``: both modes, the cooperative launch with 2, 3 and the
automatic number of programs per image, masks, the three dtypes, B up to 64, N up to 32768,
ratio 0 / 0.5 / 1. Differing rows are replayed in float64 up to REPLAY_MAX_N, failures above."""


def tiny(B, N, D, T, keep, parts):
    """A dry run's version of a shape: small enough for Triton's interpreter; an automatic
    ``parts`` becomes 2 there (the interpreter has no SMs to count)."""
    n = min(N, 70 + N % 7)
    return (min(B, 3), n, 16, min(T, 9), max(2, min(keep, n // 4)),
            parts or (2 if N > 4096 else None))


def correct(args):
    """The compact correctness set, then two calls at once on two streams."""
    seed = 2000
    for B, N, D, T, keep, gram, parts, dtypes, masks_options, ratios in CORRECT:
        if args.dry_run:
            B, N, D, T, keep, parts = tiny(B, N, D, T, keep, parts)
            dtypes = dtypes.split(",")[0]
        for dtype_name in dtypes.split(","):
            for masks in masks_options:
                for ratio in ratios:
                    seed += 1
                    name = (f"correct B={B} N={N} D={D} T={T} keep={keep} gram={gram} "
                            f"parts={parts} {dtype_name} r={ratio} masks={int(masks)}")
                    inputs = make_inputs(seed, B, N, D, T, DTYPES[dtype_name], masks, seed % 3 == 0)
                    call = (*inputs[:2], keep, ratio, *inputs[2:])
                    try:
                        with cooperative(args, parts):
                            kept = kselect.select_batched(*call, gram=gram, parts=parts)
                        compare(name, call, kept)
                    except Exception as error:  # noqa: BLE001 (report and go on)
                        report(name, f"{type(error).__name__}: {str(error)[:300]}")
    if args.dry_run:
        return skipped("correct two streams", "needs CUDA streams")
    B, N, D, T, keep = 1, 8192, 4096, 32, 819
    calls = [(*x[:2], keep, 0.5, *x[2:]) for x in
             (make_inputs(9 + i, B, N, D, T, torch.bfloat16, False) for i in range(2))]
    expected = [reference(*c) for c in calls]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    outs = [None, None]
    for i, stream in enumerate(streams):
        with torch.cuda.stream(stream):
            outs[i] = kselect.select_batched(*calls[i])
    torch.cuda.synchronize()
    same = [torch.equal(o, e) for o, e in zip(outs, expected)]
    report("correct two streams at once N=8192", None if all(same) else f"equal: {same}")


def cooperative(args, parts):
    """In a dry run, programs of a forced P > 1 grid run as threads (else they would wait for
    each other forever); on a GPU nothing to do."""
    import contextlib
    if args.dry_run and parts and parts > 1:
        from zspaprune_ops.testing.interpreter import concurrent_grids
        return concurrent_grids()
    return contextlib.nullcontext()


def sweep(args):
    seed = 1000
    cases = [  # B, N, D, T, keep
        (1, 576, 4096, 32, 64), (1, 576, 4096, 650, 64), (3, 577, 4096, 40, 192),
        (64, 576, 4096, 64, 64), (2, 2880, 4096, 650, 288), (1, 4097, 1024, 16, 400),
        (5, 1000, 5120, 33, 100), (2, 8192, 4096, 32, 819), (1, 32768, 4096, 32, 3277),
        (40, 2880, 4096, 32, 288),
    ]
    for B, N, D, T, keep in cases:
        for dtype_name in args.dtypes.split(","):
            for ratio in (0.0, 0.5, 1.0):
                for masks in (False, True):
                    if N >= 32768 and (ratio == 0.0 or masks or dtype_name != "bf16"):
                        continue  # reference ratio 0 at N = 32768 is slow; one case suffices
                    if B >= 40 and (dtype_name != "bf16" or ratio == 1.0):
                        continue
                    seed += 1
                    clustered = seed % 3 == 0
                    name = (f"sweep B={B} N={N} D={D} T={T} keep={keep} {dtype_name} r={ratio} "
                            f"masks={int(masks)} clustered={int(clustered)}")
                    inputs = make_inputs(seed, B, N, D, T, DTYPES[dtype_name], masks, clustered)
                    try:
                        compare(name, (*inputs[:2], keep, ratio, *inputs[2:]))
                    except Exception as error:  # noqa: BLE001 (report and go on)
                        report(name, f"{type(error).__name__}: {str(error)[:300]}")


def contend(args):
    """The cooperative streaming path while other kernels hold SMs: two selections on two
    streams at once, and one beside a long matrix-product loop. No hang, no wrong pick."""
    B, N, D, T, keep = 1, 32768, 4096, 32, 3277
    inputs = [make_inputs(7 + i, B, N, D, T, torch.bfloat16, False) for i in range(2)]
    calls = [(*x[:2], keep, 0.5, *x[2:]) for x in inputs]
    expected = [reference(*c) for c in calls]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in range(2)]
    for trial in range(3):
        outs = [None, None]
        start = time.perf_counter()
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                outs[i] = kselect.select_batched(*calls[i])
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        same = [torch.equal(o, e) for o, e in zip(outs, expected)]
        report(f"contend two-streams trial {trial} ({ms:.1f} ms)",
               None if all(same) else f"equal to reference: {same}; -1 rows: "
               f"{[(o < 0).all(dim=1).sum().item() for o in outs]}")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    busy = torch.cuda.Stream()
    with torch.cuda.stream(busy):
        for _ in range(40):
            a = (a @ a).clamp_(-1, 1)
    with torch.cuda.stream(streams[0]):
        out = kselect.select_batched(*calls[0])
    torch.cuda.synchronize()
    report("contend beside a matmul loop",
           None if torch.equal(out, expected[0]) else f"differs; -1 rows "
           f"{(out < 0).all(dim=1).sum().item()}")


def graphs(args):
    """The op eager, captured in a CUDA graph and replayed, and under torch.compile(fullgraph)
    with reduce-overhead (CUDA graphs) and without: the same picks. A dry run compiles with
    the aot_eager backend and skips the graphs."""
    modes = (("reduce-overhead", "max-autotune-no-cudagraphs") if not args.dry_run
             else ("aot_eager",))
    for N, keep in ((576, 64), (8192, 819)):
        B, D, T = 2, 4096, 650
        if args.dry_run:
            B, N, D, T, keep, _ = tiny(B, N, D, T, keep, None)
        x = make_inputs(N, B, N, D, T, torch.bfloat16, True)
        call = (*x[:2], keep, 0.5, *x[2:])
        eager = torch.ops.zspaprune.select(*call)
        compare(f"graphs eager op N={N}", call, eager)
        if args.dry_run:
            skipped(f"graphs replay N={N}", "needs CUDA graphs")
        else:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.ops.zspaprune.select(*call)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = torch.ops.zspaprune.select(*call)
            ok = True
            for _ in range(3):
                captured.fill_(-7)
                graph.replay()
                torch.cuda.synchronize()
                ok &= torch.equal(captured, eager)
            report(f"graphs replay N={N}", None if ok else "replay differs from eager")

        def prune(visual, prompt, prompt_mask, visual_mask):
            kept = torch.ops.zspaprune.select(visual, prompt, keep, 0.5, prompt_mask, visual_mask)
            return torch.gather(visual, 1, kept[..., None].expand(-1, -1, visual.shape[2])) * 2

        expected = prune(*x)
        for mode in modes:
            torch._dynamo.reset()
            try:
                compiled = (torch.compile(prune, fullgraph=True, backend=mode) if args.dry_run
                            else torch.compile(prune, fullgraph=True, mode=mode))
                outs = [compiled(*x).clone() for _ in range(3)]
                same = all(torch.equal(o, expected) for o in outs)
                report(f"graphs compile {mode} N={N}", None if same else "differs from eager")
            except Exception as error:  # noqa: BLE001
                report(f"graphs compile {mode} N={N}", f"{type(error).__name__}: {str(error)[:300]}")


def sanitize(args):
    """Three small launches for compute-sanitizer: Gram mode, the cooperative streaming launch
    with P = 2, and masks (with a DivPrune start); each checked against the reference."""
    cases = [  # B, N, D, T, keep, ratio, masks, gram, parts
        (2, 300, 256, 20, 40, 0.5, False, True, None),
        (1, 3000, 256, 20, 50, 0.5, False, False, 2),
        (2, 2000, 256, 20, 64, 0.0, True, False, None),
    ]
    run_launches(args, cases)


def launches(args):
    """Small launches of every path, for compute-sanitizer (and a last equality check)."""
    cases = [  # B, N, D, T, keep, ratio, masks, gram, parts
        (2, 300, 256, 20, 40, 0.5, True, True, None),
        (2, 300, 256, 20, 40, 0.0, False, True, None),
        (1, 1500, 128, 9, 60, 1.0, True, True, None),
        (2, 2000, 256, 20, 64, 0.5, True, False, None),
        (1, 3000, 256, 20, 50, 0.0, False, False, 8),
        (1, 3000, 256, 20, 50, 0.5, True, False, 1),
    ]
    run_launches(args, cases)


def run_launches(args, cases):
    for i, (B, N, D, T, keep, ratio, masks, gram, parts) in enumerate(cases):
        if args.dry_run:
            B, N, D, T, keep, _ = tiny(B, N, D, T, keep, None)
        x = make_inputs(i, B, N, D, T, torch.bfloat16, masks)
        call = (*x[:2], keep, ratio, *x[2:])
        with cooperative(args, parts):
            kept = kselect.select_batched(*call, gram=gram, parts=parts)
        compare(f"launches B={B} N={N} r={ratio} masks={int(masks)} gram={gram} parts={parts}",
                call, kept)


def profile(args):
    """Device time per kernel (torch profiler) and the op's median (do_bench), eager and as a
    CUDA-graph replay, at the benchmark's shapes."""
    import triton.testing
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    shapes = [  # name, B, N, D, T, keep, masks
        ("llava-k64-t32", 1, 576, 4096, 32, 64, False),
        ("llava-k64-t650-mask", 1, 576, 4096, 650, 64, True),
        ("llava-k64-b32", 32, 576, 4096, 64, 64, False),
        ("next-k288", 1, 2880, 4096, 64, 288, False),
        ("next-k288-t2900-mask", 1, 2880, 4096, 2900, 288, True),
        ("video-8k", 1, 8192, 4096, 64, 819, False),
        ("video-32k", 1, 32768, 4096, 64, 3277, False),
    ]
    zspaprune_ops.set_value_checks(False)
    for name, B, N, D, T, keep, masks in shapes:
        x = make_inputs(0, B, N, D, T, torch.bfloat16, masks)
        if masks:  # the LLaVA path: every row has a real prompt, every visual token is real
            x = (x[0], x[1], x[2] | (torch.arange(T, device="cuda") < 8), None)
        call = (*x[:2], keep, 0.5, *x[2:])
        fn = (lambda: torch.ops.zspaprune.select(*call))
        fn()
        eager_us = triton.testing.do_bench(fn, return_mode="median") * 1e3
        graph_us = float("nan")
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                fn()
            graph_us = triton.testing.do_bench(graph.replay, return_mode="median") * 1e3
        except Exception as error:  # noqa: BLE001
            print(f"  graph capture failed: {error}")
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        kernels = {}
        for event in prof.key_averages():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                kernels[event.key] = event.device_time_total / max(event.count, 1)
        parts = ", ".join(f"{k[:40]} {v:.1f}" for k, v in sorted(kernels.items(),
                                                                key=lambda kv: -kv[1]))
        print(f"profile {name}: eager {eager_us:.1f} us, graph {graph_us:.1f} us; "
              f"per kernel (us): {parts}", flush=True)


def modes(args):
    """Both launch-2 designs at the shapes where the choice between them is made (GRAM_MAX_N =
    4096), timed as medians, and the streaming passes counted (one barrier per pass in the
    image's sync word) beside the performance model's: what decides the Gram limit and the
    multi-pick width (kernels issue, items 8 and 10)."""
    import triton.testing

    from zspaprune_ops.kernels import model
    zspaprune_ops.set_value_checks(False)
    launches = []
    launch = kselect._launch_stream

    def recorded(launch_args, *rest):
        launches.append((launch_args[8], launch(launch_args, *rest)))
        return launches[-1][1]

    kselect._launch_stream = recorded
    for B, N in ((1, 2880), (1, 4096), (8, 2880), (8, 4096)):
        keep = N // 10
        x = make_inputs(0, B, N, 4096, 64, torch.bfloat16, False)
        call = (*x[:2], keep, 0.5, *x[2:])
        times = {}
        for gram in (True, False):
            times[gram] = triton.testing.do_bench(
                lambda: kselect.select_batched(*call, gram=gram), return_mode="median") * 1e3
        launches.clear()
        kselect.select_batched(*call, gram=False)
        sync, parts = launches[-1]
        passes = (sync[:, 0] & kfill._ARRIVALS.value) // parts - 1
        limit, kselect.GRAM_MAX_N = kselect.GRAM_MAX_N, 0  # the model's streaming prediction
        predicted = model.predict(B, N, 4096, 64, keep, device=args.device)
        kselect.GRAM_MAX_N = limit
        print(f"modes B={B} N={N} keep={keep}: gram {times[True]:.1f} us, streaming "
              f"{times[False]:.1f} us ({parts} programs/image, passes {passes.tolist()}, "
              f"model {predicted[2].steps} passes, "
              f"{model.total_seconds(predicted, args.device) * 1e6:.0f} us)", flush=True)
    kselect._launch_stream = launch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checks", nargs="+",
                        choices=["correct", "sweep", "contend", "graphs", "launches", "sanitize",
                                 "profile", "modes"])
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--device", default="h200", choices=["h100", "h200"],
                        help="the performance model's device (modes)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU under Triton's interpreter (correct, "
                             "graphs, launches, sanitize)")
    args = parser.parse_args()
    global DEVICE
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run needs TRITON_INTERPRET=1 in the environment")
        unsupported = set(args.checks) - {"correct", "graphs", "launches", "sanitize"}
        if unsupported:
            parser.error(f"--dry-run runs correct, graphs, launches, sanitize, not {unsupported}")
        DEVICE = "cpu"
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run, interpreter)"
    print(f"{name}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, commit "
          f"{os.environ.get('ZSPAPRUNE_COMMIT', 'unknown')}", flush=True)
    for check in args.checks:
        start = time.perf_counter()
        globals()[check](args)
        print(f"[{check}: {time.perf_counter() - start:.1f} s]", flush=True)
    print(f"{len(FAILURES)} failed" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
