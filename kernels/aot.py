"""Ahead-of-time compile of every kernel configuration for NVIDIA GPUs, without a GPU.

``python -m zspaprune_ops.kernels.aot [--arch 80 90] [--jobs 2]`` compiles each configuration
``select_batched`` can launch with ``triton.compile`` for a ``GPUTarget`` and prints one table
row per (configuration, arch): compile seconds and registers, shared memory, stack and local
bytes (spills) read by the ``cuobjdump`` bundled with Triton. Exits 1 if any configuration fails
to compile or takes longer than ``--max-seconds``. Run it with ``TRITON_INTERPRET`` unset.

Which configurations: every tile/warp choice, every visual dtype and every mode (Gram scratch
stored or not, DivPrune nearest-neighbour pass or not). Mask presence and the prompt dtype only
change a load, so they are covered by one variant each rather than by the full product.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def configurations():
    """[(name, kernel attribute, signature, constexprs, num_warps)] for every launch variant."""
    from . import select as k
    configs = []
    for dtype, short in _DTYPES.items():
        for gram, nearest in ((True, False), (True, True), (False, True), (False, False)):
            configs.append(_prepare(k, short, short, True, True, gram, nearest))
        for nearest in (False, True):
            configs.append((f"stream {dtype} nearest={nearest}", "_select_stream_kernel",
                            _signature(k._select_stream_kernel, {
                                "visual_ptr": f"*{short}", "counts_ptr": "*i32",
                                "cand_idx_ptr": "*i32"}),
                            {"NEED_NEAREST": nearest, "BLOCK_N": k.STREAM_BLOCK_N,
                             "BLOCK_D": k.STREAM_BLOCK_D, "PMAX": k.MAX_PARTS}, k.STREAM_WARPS))
    configs.append(_prepare(k, "bf16", "fp32", False, False, True, True))  # no masks, mixed
    for block, warps in k.REGISTER_BLOCKS:
        for nearest in (False, True):
            configs.append((f"gram-select block={block} nearest={nearest}", "_select_gram_kernel",
                            _signature(k._select_gram_kernel, {"counts_ptr": "*i32"}),
                            {"NEED_NEAREST": nearest, "BLOCK": block}, warps))
    return configs


def _prepare(k, visual, prompt, pmask, vmask, gram, nearest):
    name = (f"prepare visual={visual} prompt={prompt} masks={pmask and vmask} gram={gram} "
            f"nearest={nearest}")
    signature = _signature(k._prepare_kernel, {
        "visual_ptr": f"*{visual}", "prompt_ptr": f"*{prompt}",
        "pmask_ptr": "*i1" if pmask else "*fp32", "vmask_ptr": "*i1" if vmask else "*fp32",
        "counts_ptr": "*i32"})
    constexprs = {"HAS_PMASK": pmask, "HAS_VMASK": vmask, "STORE_GRAM": gram,
                  "NEED_NEAREST": nearest, "DOT_FP32": False, "BM": k.TILE,
                  "BK": k.tile_k(_TORCH[visual]), "BT": k.PROMPT_ROWS}
    return name, "_prepare_kernel", signature, constexprs, k.PREPARE_WARPS


def _signature(kernel, pointers):
    """Pointers default to *fp32 (out_ptr: *i64), integers to i32; constexprs marked."""
    signature = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*i64" if name == "out_ptr" else "*fp32")
        else:
            signature[name] = "i32"
    return signature


def _aligned(kernel):
    """Divisibility-by-16 hints that the runtime gives aligned pointers, row strides and D (the
    usual case, e.g. D = 4096); other values get a specialization that differs in loads only
    (for 16-bit features with D not a multiple of 16, the K loop is not cp.async-pipelined)."""
    aligned = [i for i, name in enumerate(kernel.arg_names)
               if name.endswith("_ptr") or name in ("s_vb", "s_vn", "s_pb", "s_pt", "D",
                                                     "split_len")]
    return {(i,): [["tt.divisibility", 16]] for i in aligned}


def _compile(job):
    index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import select as k
    name, attribute, signature, constexprs, warps = configurations()[index]
    kernel = getattr(k, attribute)
    for key in constexprs:
        signature[key] = "constexpr"
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, _aligned(kernel)),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps})
    except Exception as error:  # reported, and fails the run
        return name, arch, time.perf_counter() - start, None, f"{type(error).__name__}: {error}"
    seconds = time.perf_counter() - start
    usage = _resources(compiled.asm["cubin"])
    usage["SHARED"] = compiled.metadata.shared  # dynamic shared memory; cuobjdump shows static
    return name, arch, seconds, usage, None


def _resources(cubin: bytes) -> dict:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([tool, "-res-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for field in ("REG", "STACK", "SHARED", "LOCAL"):
        marker = text.find(field + ":")
        usage[field] = int(text[marker + len(field) + 1:].split()[0].rstrip(",")) if marker >= 0 else -1
    return usage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter builds no GPU code")
    jobs = [(i, arch) for i in range(len(configurations())) for arch in args.arch]
    failed = 0
    print(f"{'configuration':<70} {'sm':>3} {'s':>6} {'REG':>4} {'SHARED':>7} {'STACK':>5} {'LOCAL':>5}")
    with ProcessPoolExecutor(args.jobs) as pool:
        for name, arch, seconds, usage, error in pool.map(_compile, jobs):
            if error is not None or seconds > args.max_seconds:
                failed += 1
                print(f"{name:<70} {arch:>3} {seconds:6.1f} FAILED {error or 'too slow'}")
                continue
            print(f"{name:<70} {arch:>3} {seconds:6.1f} {usage['REG']:>4} {usage['SHARED']:>7} "
                  f"{usage['STACK']:>5} {usage['LOCAL']:>5}")
    print(f"{len(jobs) - failed} of {len(jobs)} compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
