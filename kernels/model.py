"""A performance model of the fused selection, checkable without a GPU.

    python -m zspaprune_ops.kernels.model --n 576 --d 4096 --keep 64 [--t 650 --masks]
    python -m zspaprune_ops.kernels.model --preset          # the benchmark's GPU shapes

For each launch it counts the bytes moved (HBM, L2), the FLOPs, the dependent steps, and
predicts a time on an H100 or H200 from the device's rates (``DEVICES``; the H200's copy
bandwidth and bf16 matrix rate are this workplace's measurements, the rest datasheet values or
stated guesses) and a per-step latency. It models the kernels as they are, not an ideal: in
Gram mode the relevance core costs one block argmax per pick and one L2 latency per CORE_ROWS
picks, each fill step a Gram-row load (L2 latency) plus a block argmax; streaming, every pass
reads all N x D features and meets at a grid-wide barrier, and confirms STREAM_CANDIDATES core
picks or ``fill_picks_per_pass(N)`` fill picks (simulated). ``bench/`` compares every
measured row with it (measured / predicted). The latencies are guesses until a GPU session
calibrates them (``bench/gpu_check.py profile`` gives per-launch times).
"""
import argparse
import math
from dataclasses import dataclass

import torch

from zspaprune_ops.rule import core_size

from . import select as k

ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Device:
    name: str
    hbm_Bps: float       # bytes read + written per second, large copies
    l2_Bps: float        # L2 -> SM bytes per second, whole chip
    tensor_flops: float  # dense bf16/fp16 matrix rate
    fp32_flops: float    # CUDA-core float32 rate (float32 Gram tiles: exact products)
    sms: int
    l2_latency_s: float  # one dependent load that hits L2
    hbm_latency_s: float  # one dependent load from HBM
    argmax_s: float      # block argmax over the keys of one program (shuffles + shared memory)
    barrier_s: float     # one grid-wide barrier: atomics through L2 and polling
    arrival_s: float     # each program's arrival atomic, serialized at the word's L2 slice
    topk_s: float        # tl.topk of one LIST_CHUNK x 32 load of packed keys (bitonic)
    launch_s: float      # gap between two launches inside a CUDA graph


DEVICES = {
    "h200": Device("H200", 4.3e12, 9e12, 788e12, 60e12, 132, 0.30e-6, 0.65e-6, 0.15e-6,
                   1.5e-6, 0.01e-6, 0.6e-6, 1.5e-6),
    "h100": Device("H100 SXM", 3.0e12, 9e12, 788e12, 60e12, 132, 0.30e-6, 0.65e-6, 0.15e-6,
                   1.5e-6, 0.01e-6, 0.6e-6, 1.5e-6),
}
"""H200: copy bandwidth and matrix rate measured on this workplace's H200 (KINDS.md, 4.3 TB/s
and 788 TFLOP/s); H100: 90% of the 3.35 TB/s datasheet figure, the same compute. L2 bandwidth,
latencies and launch gaps are guesses to be calibrated on a GPU."""


@dataclass(frozen=True)
class Launch:
    name: str
    hbm_bytes: float
    l2_bytes: float
    flops: float
    steps: int          # dependent steps (sequential)
    seconds: float
    limit: str          # what the prediction says bounds it


def predict(B, N, D, T, keep, ratio=0.5, dtype="bf16", masks=False, device="h200"):
    """[Launch] for one call of ``select_batched`` on one device (default: its own choice of
    Gram or streaming mode, Gram chunks, parts per image at one program per SM)."""
    dev = DEVICES[device]
    s = ITEMSIZE[dtype]
    launches = []
    gram = k.uses_gram(N)
    chunk = k.gram_chunk(B, N) if gram else B
    chunks = math.ceil(B / chunk)
    n_core = core_size(keep, ratio)
    # with masks, benchmark rows keep a real prompt token, so no row needs DivPrune's pass
    divprune = n_core == 0 or T == 0

    prompt_bytes = B * T * D * s + (B * T if masks else 0)
    loads = math.ceil(T / k.PROMPT_BLOCK_T)
    launches.append(_launch("0 prompt sum", dev, prompt_bytes, 0, 0, loads, dev.hbm_latency_s,
                            dev.tensor_flops))

    tile = k.TILE
    tiles = math.ceil(N / tile)
    stats_bytes = B * N * D * s
    if gram:
        pairs = B * tiles * (tiles + 1) // 2  # the upper triangle, mirrored on store
        flops = 2 * pairs * tile * tile * D
        l2 = pairs * 2 * tile * D * s + stats_bytes
        hbm = stats_bytes + B * N * N * 4  # features once, the float32 Gram scratch written
        launches.append(_launch("1 partial sums + Gram", dev, hbm, l2, flops, 0, 0,
                                dev.fp32_flops if dtype == "fp32" else dev.tensor_flops))
        block, _ = k.register_block(N)
        argmax = dev.argmax_s * max(1.0, block / 1024)
        fill_steps = keep - n_core + 1  # + the first pick's argmax
        core_loads = math.ceil(n_core / k.CORE_ROWS)  # the core's rows, CORE_ROWS in flight
        seconds = (n_core * argmax + core_loads * dev.l2_latency_s
                   + fill_steps * (dev.l2_latency_s + argmax))
        waves = math.ceil(chunk / dev.sms)
        launches.append(Launch("2 core + fill (Gram rows)", B * keep * N * 4, B * keep * N * 4, 0,
                               n_core + core_loads + fill_steps, seconds * waves * chunks,
                               "latency: one row load + argmax per fill step"))
    else:
        flops = 2 * B * N * N * D if divprune else 0
        l2 = (B * tiles * tiles * 2 * tile * D * s if divprune else 0) + stats_bytes
        launches.append(_launch("1 partial sums" + (" + DivPrune pass" if divprune else ""),
                                dev, stats_bytes, l2, flops, 0, 0,
                                dev.fp32_flops if dtype == "fp32" else dev.tensor_flops))
        parts = max(1, min(k.MAX_PARTS, dev.sms, dev.sms // B, math.ceil(N / k.STREAM_BLOCK_N)))
        step_bytes = B * N * D * s
        source_Bps = dev.l2_Bps if step_bytes < 40e6 else dev.hbm_Bps  # does V stay in L2?
        pass_s = step_bytes / (source_Bps * min(1.0, B * parts / dev.sms))
        fill_picks = keep - n_core - (1 if divprune else 0)  # DivPrune's first: a pass alone
        passes = (math.ceil(n_core / k.STREAM_CANDIDATES) + (1 if divprune else 0)
                  + math.ceil(fill_picks / fill_picks_per_pass(N)))
        # a pass beside its feature stream: the barrier (its word alone on a cache line, so
        # only the B * parts arrivals queue at it, not the lists' stores), the merge of the P
        # lists that every program does itself (per LIST_CHUNK lists one L2 round trip and a
        # bitonic top-k, then the list stores and keys), the candidates' [16, D] rows
        # (Triton's 3 loads in flight per chunk) and one small reduction per confirmed pick
        barrier_s = dev.barrier_s + parts * dev.arrival_s
        merge_s = (math.ceil(parts / k.LIST_CHUNK) * (dev.l2_latency_s + dev.topk_s)
                   + 2 * dev.l2_latency_s)
        candidates_s = math.ceil(D / k.candidate_k(_TORCH_DTYPE[dtype])) / 3 * dev.l2_latency_s
        overhead_s = passes * (barrier_s + merge_s + candidates_s) + keep * dev.argmax_s
        seconds = passes * pass_s + overhead_s
        hbm = step_bytes * passes if source_Bps == dev.hbm_Bps else stats_bytes
        launches.append(Launch(f"2 core + fill (streaming, {parts} programs/image)", hbm,
                               step_bytes * passes, 2 * B * N * D * k.STREAM_CANDIDATES * passes,
                               passes, seconds,
                               "bandwidth: all N x D features per pass"
                               if passes * pass_s > overhead_s
                               else "latency: barrier, merge and candidates per pass"))
    return launches


FILL_PICKS_PER_PASS = ((576, 3.1), (2880, 6.8), (8192, 10.5), (32768, 13.4))
"""(N, fill picks per streaming pass) with 16 candidates: ``bench/multipick_sim.py``'s smaller
value of random and clustered tokens (D = 256, keep = 5% of N)."""


def fill_picks_per_pass(n: int) -> float:
    """FILL_PICKS_PER_PASS interpolated in log N (clamped at its ends)."""
    points = FILL_PICKS_PER_PASS
    if n <= points[0][0]:
        return points[0][1]
    for (n0, r0), (n1, r1) in zip(points, points[1:]):
        if n <= n1:
            return r0 + (r1 - r0) * math.log(n / n0) / math.log(n1 / n0)
    return points[-1][1]


def _launch(name, dev, hbm, l2, flops, loads, latency, flop_rate):
    """A parallel launch: bound by the largest of its bandwidth, arithmetic and latency terms."""
    terms = {"HBM bandwidth": hbm / dev.hbm_Bps, "L2 bandwidth": l2 / dev.l2_Bps,
             "arithmetic": flops / flop_rate, "dependent loads": loads * latency}
    limit = max(terms, key=terms.get)
    return Launch(name, hbm, l2, flops, loads, terms[limit], limit)


def total_seconds(launches, device="h200") -> float:
    """Predicted time of one call replayed in a CUDA graph: the launches plus their gaps."""
    return sum(launch.seconds for launch in launches) + DEVICES[device].launch_s * len(launches)


PRESET = {  # the benchmark's GPU shapes (bench/bench_select.py --preset gpu), bf16, D = 4096
    "llava7b-k64": (1, 576, 4096, 64, 64, False), "llava7b-k64-t650-masks": (1, 576, 4096, 650, 64, True),
    "llava7b-k192": (1, 576, 4096, 64, 192, False), "llava7b-k64-b32": (32, 576, 4096, 64, 64, False),
    "next-k288": (1, 2880, 4096, 64, 288, False), "next-k288-b8-masks": (8, 2880, 4096, 128, 288, True),
    "video-8k": (1, 8192, 4096, 64, 819, False), "video-32k": (1, 32768, 4096, 64, 3276, False),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n", type=int, default=576)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--t", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--dtype", choices=sorted(ITEMSIZE), default="bf16")
    parser.add_argument("--masks", action="store_true", help="prompt and visual masks given")
    parser.add_argument("--device", choices=sorted(DEVICES), default="h200")
    parser.add_argument("--preset", action="store_true", help="every benchmark GPU shape")
    args = parser.parse_args(argv)
    shapes = PRESET if args.preset else {
        "shape": (args.batch, args.n, args.d, args.t, args.keep, args.masks)}
    dev = DEVICES[args.device]
    print(f"model for {dev.name}: HBM {dev.hbm_Bps / 1e12:.1f} TB/s, L2 {dev.l2_Bps / 1e12:.0f} "
          f"TB/s, {dev.tensor_flops / 1e12:.0f} TFLOP/s; per step: L2 load "
          f"{dev.l2_latency_s * 1e6:.2f} us, argmax {dev.argmax_s * 1e6:.2f} us, grid barrier "
          f"{dev.barrier_s * 1e6:.2f} us + {dev.arrival_s * 1e9:.0f} ns per program, lists' "
          f"top-k {dev.topk_s * 1e6:.2f} us per {k.LIST_CHUNK} lists; launch gap "
          f"{dev.launch_s * 1e6:.1f} us")
    for name, (B, N, D, T, keep, masks) in shapes.items():
        launches = predict(B, N, D, T, keep, args.ratio, args.dtype, masks, args.device)
        print(f"\n{name}: B={B} N={N} D={D} T={T} keep={keep} ratio={args.ratio} {args.dtype}"
              f"{' masks' if masks else ''}: predicted {total_seconds(launches, args.device) * 1e6:.1f} us")
        print(f"  {'launch':<40} {'HBM MB':>8} {'L2 MB':>8} {'GFLOP':>7} {'steps':>6} {'us':>9}  bound")
        for launch in launches:
            print(f"  {launch.name:<40} {launch.hbm_bytes / 1e6:8.2f} {launch.l2_bytes / 1e6:8.2f} "
                  f"{launch.flops / 1e9:7.2f} {launch.steps:6d} {launch.seconds * 1e6:9.1f}  "
                  f"{launch.limit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
