"""Kernel benchmark of ``zspaprune_ops.select``: every implementation side by side, same inputs.

    python bench/bench_select.py --preset gpu                  # on a CUDA machine
    TRITON_INTERPRET=1 python bench/bench_select.py --preset cpu-smoke
    python bench/bench_select.py --shapes llava7b-k64,B=2,N=300,D=64,keep=30 --impls fused,reference

Implementations: ``fused`` (``backend="triton"``; on CPU only under ``TRITON_INTERPRET=1`` and at tiny sizes), ``blocked`` (``backend="blocked"``, what
``auto`` runs off CUDA), ``reference`` (eager pure PyTorch), ``reference_compiled``
(torch.compile of the reference), ``divprune_loop`` (N×N matrix plus a Python loop; see
bench/baselines.py) and ``matmul_floor`` (one N×keep product: the arithmetic floor, not a
selection). Each selection is checked equal to the reference's before it is timed (where the
reference runs: ``--slow-max-work``); an impl that differs or fails is reported and not timed
(exit status 1). ``--rss`` adds, on CPU, each impl's peak RSS growth over one call (in a fresh
process) as ``extra_peak_bytes``. Rows are
appended after each shape to ``--out FILE`` (default: a fresh git-ignored file under
``bench/results/local/``; ``--out bench/results/<device>.json`` adds to the committed results).
"""
import argparse
import fnmatch
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import baselines
import results
import zspaprune_ops
from zspaprune_ops._validate import FEATURE_DTYPES
from zspaprune_ops.testing.measure import median_seconds, peak_bytes
from zspaprune_ops.reference.naive import select_batched

IMPLS = ("fused", "fused_graph", "blocked", "reference", "reference_compiled", "divprune_loop",
         "matmul_floor")
FLOORS = ("matmul_floor",)
"""Impls that are no selection (their output is not checked)."""
SLOW_IMPLS = ("reference", "divprune_loop")
"""Impls skipped where B·N·D·keep exceeds ``--slow-max-work`` (a pass over the features per pick)."""
INTERPRETER_MAX_WORK = 1 << 18
"""On CPU ``fused`` runs in Triton's interpreter only where B·N·D·keep is at most this."""
SLOW_CALL_S = 0.2
"""On CUDA, calls slower than this are timed over 3 runs with CUDA events, not do_bench."""


@dataclass(frozen=True)
class Shape:
    """One benchmark case: B images of N visual tokens and T prompt tokens of size D."""

    B: int
    N: int
    D: int
    T: int
    keep: int
    ratio: float = 0.5
    dtype: str = "bfloat16"
    masks: bool = False


def _case(B, N, D, T, keep, dtype="bfloat16", masks=False, ratio=0.5) -> Shape:
    return Shape(B, N, D, T, keep, ratio, dtype, masks)


PRESETS = {
    "gpu": {
        "llava7b-k64": _case(1, 576, 4096, 64, 64),
        "llava7b-k128": _case(1, 576, 4096, 64, 128),
        "llava7b-k192": _case(1, 576, 4096, 64, 192),
        "llava7b-k64-fp16": _case(1, 576, 4096, 64, 64, "float16"),
        "llava7b-k64-fp32": _case(1, 576, 4096, 64, 64, "float32"),
        "llava13b-k64": _case(1, 576, 5120, 64, 64),
        "llava13b-k192": _case(1, 576, 5120, 64, 192),
        "llava7b-k64-t650-masks": _case(1, 576, 4096, 650, 64, masks=True),  # the LLaVA path
        "llava7b-k64-b8-masks": _case(8, 576, 4096, 128, 64, masks=True),
        "llava7b-k64-b32": _case(32, 576, 4096, 64, 64),
        "llava7b-k64-b64-masks-t512": _case(64, 576, 4096, 512, 64, masks=True),
        "next-k288": _case(1, 2880, 4096, 64, 288),
        "next-k640": _case(1, 2880, 4096, 64, 640),
        "next-k288-b8-masks": _case(8, 2880, 4096, 128, 288, masks=True),
        "video-8k": _case(1, 8192, 4096, 64, 819),
        "video-16k": _case(1, 16384, 4096, 64, 1638),
        "video-32k": _case(1, 32768, 4096, 64, 3276),
        "video-32k-b8-masks": _case(8, 32768, 4096, 64, 3276, masks=True),
    },
    "cpu": {  # issue 20's grid: float32 and bfloat16, B = 1 and 8, N = 576, 2880, 8192
        f"cpu-n{N}-{'f32' if dtype == 'float32' else 'bf16'}{'-b8' if B == 8 else ''}":
            _case(B, N, 4096, 32, keep, dtype)
        for dtype in ("float32", "bfloat16") for N, keep in ((576, 64), (2880, 288), (8192, 819))
        for B in (1, 8)
    },
    "cpu-smoke": {
        "tiny-masks": _case(2, 64, 32, 8, 8, "float16", masks=True),
        "llava-d256-k16": _case(1, 576, 256, 32, 16, "float32"),
        "llava-d256-k16-b4-masks": _case(4, 576, 256, 32, 16, masks=True),
        "next-d64-k64": _case(1, 2880, 64, 16, 64, "float32", ratio=0.25),
    },
}
ALL_SHAPES = {name: shape for preset in PRESETS.values() for name, shape in preset.items()}


@dataclass
class Inputs:
    """visual [B, N, D], prompt [B, T, D] in the shape's dtype; bool masks [B, N], [B, T] or None."""

    visual: torch.Tensor
    prompt: torch.Tensor
    prompt_mask: object
    visual_mask: object

    def args(self, shape: Shape) -> tuple:
        return (self.visual, self.prompt, shape.keep, shape.ratio, self.prompt_mask,
                self.visual_mask)


def make_inputs(shape: Shape, device, seed: int = 0) -> Inputs:
    """Inputs on which float32 math is exact in any summation order, so every correct impl picks
    the same tokens (ties included: they are frequent and must go to the lower index).

    A real visual token is ±2^s (s in -2..2) on a window of K = 4^k <= D coordinates (zero
    elsewhere): its norm is a power of two and every cosine a multiple of 1/K. Each image's real
    prompt tokens are one such vector repeated, their count a power of two when T is one
    (then their mean is exact however it is computed). Padded tokens
    (``masks``: right-padded visual rows down to about keep, prompt rows down to T/4, odd rows
    left-padded) hold random normal values the rule must ignore.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = FEATURE_DTYPES[shape.dtype]
    B, N, T = shape.B, shape.N, shape.T
    visual = torch.cat([_exact_tokens(N, shape.D, gen, device) for _ in range(B)]).view(B, N, -1)
    prompt = _exact_tokens(B, shape.D, gen, device)[:, None, :].expand(B, T, -1)
    if not shape.masks:
        return Inputs(visual.to(dtype), prompt.to(dtype).contiguous(), None, None)
    rows = torch.arange(B, device=device)[:, None]
    n_visual = shape.keep + (N - shape.keep) * (4 - rows % 4) // 4
    visual_mask = torch.arange(N, device=device) < n_visual
    n_prompt = torch.clamp(T >> (rows % 3), min=1)
    positions = torch.arange(T, device=device)
    prompt_mask = torch.where(rows % 2 == 1, positions >= T - n_prompt, positions < n_prompt)
    visual = torch.where(visual_mask[..., None], visual, _noise(visual.shape, gen, device))
    prompt = torch.where(prompt_mask[..., None], prompt, _noise(prompt.shape, gen, device))
    return Inputs(visual.to(dtype), prompt.to(dtype), prompt_mask, visual_mask)


def _exact_tokens(rows: int, D: int, gen, device) -> torch.Tensor:
    window = 4 ** ((D.bit_length() - 1) // 2)
    offset = torch.randint(0, D, (rows, 1), generator=gen, device=device)
    inside = (torch.arange(D, device=device) - offset) % D < window
    signs = torch.randint(0, 2, (rows, D), generator=gen, device=device, dtype=torch.int8) * 2 - 1
    scale = 2.0 ** torch.randint(-2, 3, (rows, 1), generator=gen, device=device)
    return torch.where(inside, signs * scale, 0.0)


def _noise(size, gen, device) -> torch.Tensor:
    return torch.randn(size, generator=gen, device=device)


def floor_bytes(shape: Shape) -> int:
    """Bytes every implementation must read once: the features and the masks."""
    itemsize = FEATURE_DTYPES[shape.dtype].itemsize
    masks = shape.B * (shape.N + shape.T) if shape.masks else 0
    return shape.B * (shape.N + shape.T) * shape.D * itemsize + masks


def build(impl: str, shape: Shape, inputs: Inputs, limits: argparse.Namespace):
    """(a no-argument callable running ``impl`` on ``inputs``, None) or (None, why it is skipped)."""
    args = inputs.args(shape)
    device = inputs.visual.device
    if impl == "fused":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return None, "fused on CPU needs TRITON_INTERPRET=1"
        if device.type == "cpu" and shape.B * shape.N * shape.D * shape.keep > INTERPRETER_MAX_WORK:
            return None, f"too large for Triton's interpreter (B·N·D·keep > {INTERPRETER_MAX_WORK})"
        return lambda: _public(args, "triton"), None
    if impl == "fused_graph":
        if device.type != "cuda":
            return None, "CUDA graphs need a GPU"
        return _graph_replay(lambda: _public(args, "triton"), device), None
    if impl in SLOW_IMPLS and _work(shape) > limits.slow_max_work:
        return None, (f"B·N·D·keep > {limits.slow_max_work:.0e}: a pass over the features per "
                      "pick takes minutes here")
    if impl == "blocked":
        return lambda: _public(args, "blocked"), None
    if impl == "matmul_floor":
        return baselines.matmul_floor(inputs.visual, shape.keep), None
    if impl == "reference":
        return lambda: _public(args, "reference"), None
    if impl == "reference_compiled":
        if shape.keep > limits.compile_max_keep:
            return None, (f"keep > {limits.compile_max_keep}: compile time grows with keep "
                          "(dynamo unrolls the keep loop)")
        compiled = baselines.reference_compiled()
        return lambda: compiled(*args), None
    if impl == "divprune_loop":
        need = baselines.divprune_bytes(shape.B, shape.N, shape.keep)
        if need > limits.divprune_max_bytes:
            return None, (f"N×N scratch {need / 2**30:.1f} GiB > bound "
                          f"{limits.divprune_max_bytes / 2**30:.1f} GiB")
        return lambda: baselines.divprune_loop(*args), None
    raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")


def _work(shape: Shape) -> int:
    return shape.B * shape.N * shape.D * shape.keep


def _graph_replay(fn, device):
    """``fn`` captured in a CUDA graph (after a warm-up that compiles the kernels): returns a
    callable that replays it and returns the captured output, so the host's launch overhead
    stays out of the time."""
    checks = zspaprune_ops.set_value_checks(False)  # no host sync inside a capture
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    finally:
        zspaprune_ops.set_value_checks(checks)

    def replay():
        graph.replay()
        return out
    return replay


def _public(args: tuple, backend: str) -> torch.Tensor:
    visual, prompt, keep, ratio, prompt_mask, visual_mask = args
    return zspaprune_ops.select(visual, prompt, keep, ratio, prompt_mask=prompt_mask,
                                visual_mask=visual_mask, backend=backend)


def median_us(fn, device, repeat: int) -> float:
    """Median wall time of ``fn`` in µs. CUDA: triton's do_bench (it flushes L2 before every
    call, so small inputs are read from HBM as in a model), or CUDA events for slow calls;
    CPU: the median of ``repeat`` timed calls (zspaprune_ops.testing.measure)."""
    if device.type == "cuda":
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        if time.perf_counter() - start < SLOW_CALL_S:
            import triton.testing
            return triton.testing.do_bench(fn, return_mode="median") * 1e3
        return _median([_event_seconds(fn) for _ in range(3)]) * 1e6
    return median_seconds(fn, device, repeat, warmup=0) * 1e6


def _event_seconds(fn) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3


def _median(values: list) -> float:
    return sorted(values)[len(values) // 2]


def extra_peak_bytes(fn, device):
    """Device memory one call allocates beyond what is live before it (inputs, outputs kept);
    None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return peak_bytes(fn, device) - torch.cuda.memory_allocated(device)


def rss_growth(impl: str, shape: Shape) -> int:
    """Peak RSS growth (bytes) over one call of ``impl`` at ``shape``, in a fresh process whose
    inputs are built and whose libraries are warmed up (one call on tiny inputs) first. glibc's
    mmap threshold is fixed at 64 KiB there, so that memory freed while building the inputs is
    not silently reused (the growth would then read 0)."""
    import json
    import subprocess
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--rss-child", impl,
                          json.dumps(asdict(shape))], capture_output=True, text=True, check=True,
                         env=env)
    return int(out.stdout.split()[-1])


def _rss_child(impl: str, spec: str) -> None:
    """Print the peak RSS growth of one call: Linux's peak (VmHWM) is reset to the current RSS
    after the inputs are built (their temporaries peaked higher), then read after the call."""
    import json
    limits = build_parser().parse_args(["--slow-max-work", "1e30"])
    limits.compile_max_keep, tiny = 0, _case(1, 16, 8, 2, 2, "float32")
    shape = Shape(**json.loads(spec))
    inputs = make_inputs(shape, torch.device("cpu"))
    build(impl, tiny, make_inputs(tiny, torch.device("cpu")), limits)[0]()
    fn = build(impl, shape, inputs, limits)[0]
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status_kib("VmRSS")
    fn()
    print((_status_kib("VmHWM") - before) * 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def run_shape(shape: Shape, impls, device, limits, bandwidth) -> tuple:
    """Rows of every impl at ``shape`` and the impls whose output differed from the reference."""
    inputs = make_inputs(shape, device)
    expected = (select_batched(*inputs.args(shape)) if _work(shape) <= limits.slow_max_work
                else None)
    floor = results.floor_fields(floor_bytes(shape), bandwidth)
    rows, wrong = [], []
    for impl in impls:
        row = {"bench": "select", "shape": asdict(shape), "impl": impl, "median_us": None,
               "extra_peak_bytes": None, **floor}
        if device.type == "cpu":
            row["cpu_threads"] = torch.get_num_threads()
        if impl.startswith("fused") and device.type == "cuda":
            row.update(_prediction(shape, device))
        fn, reason = build(impl, shape, inputs, limits)
        if fn is not None:
            reason = _first_call(fn, impl, None if impl in FLOORS else expected, row)
            if reason is not None:
                wrong.append(impl)
        if reason is not None:
            row["skipped"] = reason
        else:
            checks = zspaprune_ops.set_value_checks(False)  # no keep-vs-mask sync inside timings
            try:
                row["median_us"] = median_us(fn, device, limits.repeat)
                row["extra_peak_bytes"] = extra_peak_bytes(fn, device)
                if device.type == "cpu" and limits.rss and impl not in ("fused",
                                                                        "reference_compiled"):
                    row["extra_peak_bytes"] = rss_growth(impl, shape)
            finally:
                zspaprune_ops.set_value_checks(checks)
        rows.append(row)
    return rows, wrong


def _prediction(shape: Shape, device) -> dict:
    """The kernels' performance model for this shape on an H100 / H200 (as a CUDA-graph
    replay): ``predicted_us``, for measured / predicted; nothing on other GPUs."""
    from zspaprune_ops.kernels import model
    name = results.device_name(device)
    kind = "h200" if "H200" in name else "h100" if "H100" in name else None
    if kind is None:
        return {}
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[shape.dtype]
    launches = model.predict(shape.B, shape.N, shape.D, shape.T, shape.keep, shape.ratio, dtype,
                             shape.masks, kind)
    return {"predicted_us": model.total_seconds(launches, kind) * 1e6}


def _first_call(fn, impl: str, expected: torch.Tensor, row: dict):
    """Warm up (compile) and check ``fn`` against the reference's picks; None if it is right,
    else why it is not timed."""
    start = time.perf_counter()
    try:
        kept = fn()
    except Exception as error:  # noqa: BLE001 (one failing impl must not lose the others' rows)
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if impl == "reference_compiled":
        row["compile_s"] = round(time.perf_counter() - start, 2)
    if expected is not None and not torch.equal(kept, expected):
        return "output differs from the reference: not timed"
    return None


def parse_shapes(text: str) -> dict:
    """Names (or glob patterns: ``llava*``) of preset shapes and ad-hoc specs
    ``B=2,N=300,D=64,keep=30`` (unset fields from llava7b-k64), comma-separated; returns
    {name: Shape}."""
    shapes, spec = {}, {}
    for token in filter(None, text.split(",")):
        if "=" in token:
            key, value = token.split("=", 1)
            if key not in Shape.__dataclass_fields__:
                raise ValueError(f"--shapes: unknown field {key!r} in {token!r}")
            spec[key] = value
            continue
        if spec:
            shapes[_spec_name(spec)] = _spec_shape(spec)
            spec = {}
        names = fnmatch.filter(ALL_SHAPES, token)
        if not names:
            raise ValueError(f"--shapes: unknown shape {token!r}; choose from {sorted(ALL_SHAPES)}")
        shapes.update((name, ALL_SHAPES[name]) for name in names)
    if spec:
        shapes[_spec_name(spec)] = _spec_shape(spec)
    return shapes


def _spec_name(spec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items())


def _spec_shape(spec: dict) -> Shape:
    fields = Shape.__dataclass_fields__
    values = {k: v.lower() in ("1", "true") if fields[k].type is bool else fields[k].type(v)
              for k, v in spec.items()}
    if values.get("dtype", "bfloat16") not in FEATURE_DTYPES:
        raise ValueError(f"--shapes: dtype must be one of {sorted(FEATURE_DTYPES)}")
    return replace(ALL_SHAPES["llava7b-k64"], **values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of shapes")
    parser.add_argument("--shapes", help="comma-separated shape names, globs (llava*) and/or "
                                         "field=value specs")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated ({','.join(IMPLS)})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per impl on CPU (5)")
    parser.add_argument("--compile-max-keep", type=int,
                        help="skip reference_compiled above this keep (CUDA 64, CPU 8)")
    parser.add_argument("--divprune-max-bytes", type=int, default=baselines.DIVPRUNE_MAX_BYTES,
                        help="skip divprune_loop where its N×N scratch exceeds this (4 GiB)")
    parser.add_argument("--slow-max-work", type=float, default=4e9,
                        help=f"skip {', '.join(SLOW_IMPLS)} (and the reference check) where "
                             "B·N·D·keep exceeds this (4e9)")
    parser.add_argument("--rss", action="store_true",
                        help="CPU: measure each impl's peak RSS growth in a fresh process")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help="torch CPU threads (torch's default)")
    parser.add_argument("--out", type=Path,
                        help="results file the rows are appended to (default: a new file "
                             "bench/results/local/<device>-<time>.json, git-ignored)")
    parser.add_argument("--dry-run", action="store_true", help="print only; write no rows")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.rss_child:
        _rss_child(*args.rss_child)
        return 0
    shapes = dict(PRESETS[args.preset]) if args.preset else {}
    shapes.update(parse_shapes(args.shapes or ""))
    if not shapes:
        raise SystemExit("give --preset and/or --shapes")
    impls = [impl for impl in args.impls.split(",") if impl]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_max_keep is None:
        args.compile_max_keep = baselines.COMPILE_MAX_KEEP.get(device.type, 8)
    out = args.out or results.new_results_file(device)
    bandwidth = results.hbm_bandwidth(device)
    floor = f"{bandwidth[0]:.3g} B/s, {bandwidth[1]}" if bandwidth[0] else bandwidth[1]
    print(f"{results.device_name(device)} (HBM floor bandwidth: {floor}); {len(shapes)} shape(s); "
          f"impls {','.join(impls)}", flush=True)
    all_rows, wrong = [], []
    for name, shape in shapes.items():
        start = time.perf_counter()
        rows, bad = run_shape(shape, impls, device, args, bandwidth)
        saved = "" if args.dry_run else f", rows appended to {results.append(rows, device, out)}"
        print(f"{name}: {time.perf_counter() - start:.1f} s{saved}", flush=True)
        all_rows += rows
        wrong += [f"{name}: {impl}" for impl in bad]
    print("\n".join(results.render_table(all_rows)))
    if not args.dry_run:
        print(f"rows in {out}; render them with: python bench/results.py {out}")
    if wrong:
        print("WRONG OR FAILED, NOT TIMED: " + "; ".join(wrong), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
