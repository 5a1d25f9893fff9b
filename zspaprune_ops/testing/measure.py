"""Wall-clock medians and peak tensor memory of callables, and the environment fields of results
rows (shared by the benchmarks, the demo and ``zspaprune eval``)."""
import contextlib
import os
import time
from typing import Callable, Iterable, List, Optional, Sequence

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({device.type})" if device.type != "cpu" else "cpu"


def environment(device: torch.device) -> dict:
    """Fields every results row carries: device name, versions, commit and date."""
    import datetime
    import subprocess

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:  # ZSPAPRUNE_COMMIT where the tree has no .git (a copy sent to a GPU machine)
        commit = os.environ.get("ZSPAPRUNE_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": commit, "date": datetime.date.today().isoformat()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeat: int = 5,
                   warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` untimed ones."""
    return interleaved_medians([fn], device, repeat, warmup)[0]


def interleaved_medians(fns: Sequence[Callable[[], object]], device: torch.device,
                        repeat: int = 5, warmup: int = 1) -> List[float]:
    """Median wall-clock seconds of each ``fn()``, timed in turns (fn0, fn1, ..., fn0, ...).

    Taking turns spreads slow phases of a shared machine over every callable instead of
    charging them to whichever ran then. The device is synchronized around each run, so queued
    GPU work is counted.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    times = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            for _ in range(warmup):
                fn()
        for _ in range(repeat):
            for fn, fn_times in zip(fns, times):
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                fn_times.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes of live tensors on ``device`` while ``fn()`` runs, weights and inputs included.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the torch profiler's memory
    timeline (every tensor the run allocates or touches); ``None`` where that is unavailable
    (it uses a private profiler API) or on other devices.
    """
    with torch.inference_mode():
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        if device.type == "cpu":
            return _cpu_peak_bytes(fn)
    return None


def resident_bytes(tensors: Iterable[torch.Tensor], device: torch.device) -> int:
    """Bytes held before a measured call, to subtract from its peak: CUDA's allocated memory,
    elsewhere the bytes of ``tensors`` (what the call reads: weights, inputs)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_peak_bytes(fn) -> Optional[int]:
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with _native_stderr_silenced(), profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                with_stack=True) as prof:
            fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(
            torch.device("cpu"))
        return int(max(sum(step) for step in sizes)) if sizes else None
    except Exception:  # a private API: any change in it means "not measured", not a crash
        return None


@contextlib.contextmanager
def _native_stderr_silenced():
    """Some torch builds' profilers log start/stop lines from C++ straight to fd 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
