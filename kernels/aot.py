"""Ahead-of-time compile of every kernel configuration for NVIDIA GPUs, without a GPU.

``python -m zspaprune_ops.kernels.aot [--arch 80 90] [--jobs 2]`` compiles each configuration
``select_batched`` can launch with ``triton.compile`` for a ``GPUTarget`` and prints one table
row per (configuration, arch): compile seconds; REG (registers per thread), SHARED (shared
memory bytes per program), STACK (per-thread stack frame bytes) and LOCAL (per-thread local
memory bytes outside the stack), read by the ``cuobjdump`` bundled with Triton; and SPILL, the
bytes of registers spilled to local memory: the spill stores in the log of the ``ptxas -v`` run
that built the cubin (with Triton's flags: ``--fmad=false`` changes the register allocation). A stack frame without
spills holds a call's frame or a small local array, not spilled registers. Exits 1 if any
configuration fails to compile or takes longer than ``--max-seconds``. Run it with
``TRITON_INTERPRET`` unset.

Which configurations: every tile/warp choice, every visual dtype and every mode (Gram scratch
stored or not, DivPrune nearest-neighbour pass or not). Mask presence and the prompt dtype only
change a load, so they are covered by one variant each rather than by the full product.
"""
import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def configurations():
    """[(name, kernel attribute, signature, constexprs, compile options)] for every launch
    variant, the options as ``select_batched`` passes them."""
    from . import select as k
    configs = []
    for prompt in ("fp32", "bf16"):
        for pmask in (True, False):
            configs.append((f"prompt-sum prompt={prompt} mask={pmask}", "_prompt_kernel",
                            _signature(k._prompt_kernel, {
                                "prompt_ptr": f"*{prompt}", "pmask_ptr": _mask(pmask),
                                "counts_ptr": "*i32", "sync_ptr": "*i64"}),
                            {"HAS_PMASK": pmask, "BD": k.PROMPT_BLOCK_D, "BT": k.PROMPT_BLOCK_T},
                            {"num_warps": k.PROMPT_WARPS}))
    for dtype, short in _DTYPES.items():
        for gram, nearest in ((True, False), (True, True), (False, True), (False, False)):
            configs.append(_prepare(k, short, True, gram, nearest))
        for nearest in (False, True):
            configs.append((f"stream {dtype} nearest={nearest}", "_select_stream_kernel",
                            _signature(k._select_stream_kernel, {
                                "visual_ptr": f"*{short}", "counts_ptr": "*i32",
                                "sync_ptr": "*i64"}),
                            {"NEED_NEAREST": nearest, "BLOCK_N": k.STREAM_BLOCK_N,
                             "CAND": k.STREAM_CANDIDATES,
                             "BLOCK_K": k.candidate_k(getattr(torch, dtype)),
                             "CHUNK": k.LIST_CHUNK, "INTERPRETED": False},
                            {"num_warps": k.STREAM_WARPS}))
    configs.append(_prepare(k, "bf16", False, True, True))  # no visual mask
    for block, warps in k.REGISTER_BLOCKS:
        for nearest in (False, True):
            configs.append((f"gram-select block={block} nearest={nearest}", "_select_gram_kernel",
                            _signature(k._select_gram_kernel, {"counts_ptr": "*i32"}),
                            {"NEED_NEAREST": nearest, "BLOCK": block, "ROWS": k.CORE_ROWS},
                            {"num_warps": warps}))
    return configs


def _mask(present):
    return "*i1" if present else "*fp32"


def _prepare(k, visual, vmask, gram, nearest):
    name = f"prepare visual={visual} mask={vmask} gram={gram} nearest={nearest}"
    signature = _signature(k._prepare_kernel, {
        "visual_ptr": f"*{visual}", "vmask_ptr": _mask(vmask), "counts_ptr": "*i32"})
    constexprs = {"HAS_VMASK": vmask, "STORE_GRAM": gram, "NEED_NEAREST": nearest,
                  "DOT_FP32": False, "BM": k.TILE,
                  "BK": k.tile_k(_TORCH[visual])}
    options = {"num_warps": k.PREPARE_WARPS, "num_stages": k.prepare_stages(_TORCH[visual])}
    return name, "_prepare_kernel", signature, constexprs, options


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
    """Divisibility-by-16 hints as the runtime gives them: every pointer but those the kernel
    does not specialize on alignment (masks, output rows: they compile one variant whatever
    their address), and D, the feature row strides and split_len when D is a multiple of 16
    (e.g. 4096). Scratch views are always aligned and unaligned features are copied, so these
    are the only variants but for D not a multiple of 16 (loads differ only: for 16-bit features
    the K loop is not cp.async-pipelined)."""
    loose = set(kernel.do_not_specialize_on_alignment) | set(kernel.do_not_specialize)
    aligned = [i for i, name in enumerate(kernel.arg_names) if name not in loose and (
        name.endswith("_ptr") or name in ("s_vn", "s_pt", "D", "split_len"))]
    return {(i,): [["tt.divisibility", 16]] for i in aligned}


def _compile(job):
    index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import select as k
    name, attribute, signature, constexprs, options = configurations()[index]
    kernel = getattr(k, attribute)
    for key in constexprs:
        signature[key] = "constexpr"
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG (main) prints ptxas -v
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, _aligned(kernel)),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={**options, **k.LAUNCH_OPTIONS})
    except Exception as error:  # reported, and fails the run
        return name, arch, time.perf_counter() - start, None, f"{type(error).__name__}: {error}"
    seconds = time.perf_counter() - start
    usage = _resources(compiled.asm["cubin"])
    usage["SHARED"] = compiled.metadata.shared  # dynamic shared memory; cuobjdump shows static
    found = re.search(r"(\d+) bytes spill stores", log.getvalue())
    usage["SPILL"] = int(found.group(1)) if found else -1
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
    # SPILL is read from the log of the ptxas run that builds the cubin (its flags: --fmad=false
    # here, and whatever the Triton version adds); a cache hit runs no ptxas, so compile afresh
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with tempfile.TemporaryDirectory(prefix="zspaprune-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        return _compile_all(args)


def _compile_all(args) -> int:
    jobs = [(i, arch) for i in range(len(configurations())) for arch in args.arch]
    failed = 0
    print(f"{'configuration':<62} {'sm':>3} {'s':>6} {'REG':>4} {'SHARED':>7} {'STACK':>5} "
          f"{'LOCAL':>5} {'SPILL':>5}")
    with ProcessPoolExecutor(args.jobs) as pool:
        for name, arch, seconds, usage, error in pool.map(_compile, jobs):
            if error is not None or seconds > args.max_seconds:
                failed += 1
                print(f"{name:<62} {arch:>3} {seconds:6.1f} FAILED {error or 'too slow'}")
                continue
            print(f"{name:<62} {arch:>3} {seconds:6.1f} {usage['REG']:>4} {usage['SHARED']:>7} "
                  f"{usage['STACK']:>5} {usage['LOCAL']:>5} {usage['SPILL']:>5}")
    print(f"{len(jobs) - failed} of {len(jobs)} compiled. REG: registers per thread; SHARED: "
          "bytes per program; STACK / LOCAL: per-thread stack frame / other local memory bytes; "
          "SPILL: bytes of registers spilled to local memory (ptxas -v)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
