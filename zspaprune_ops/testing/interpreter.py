"""Triton's interpreter with the programs of a grid running at once, as threads.

Under ``TRITON_INTERPRET=1`` Triton runs the programs of a grid one after another, so a
program that waits for another never sees it arrive: grid-wide barriers cannot complete.
``concurrent_grids()`` patches Triton's interpreter (not this package) for the duration of a
``with`` block: every launch starts one thread per program and joins them. The interpreter keeps
the grid index in one global builder; here it is per thread. Its atomics are real atomics on
the shared host copy of each argument, and ordinary loads and stores see each other at once, so
cross-program protocols (barriers, double-buffered lists) run as written.

``jitter`` (seconds) makes the schedule adversarial: around every arrival at a barrier (an
atomic that changes the word; polls are never slowed), every store and every volatile load (what
another program wrote), a program sleeps a random time between half and all of
``jitter`` times its slowness (without jitter it still yields the interpreter lock there). Slowness is spread
evenly from 0 to 1 over the programs of a launch in an order rotated by ``seed`` (seed 0: the
first program is the fastest, the last the slowest). Slow programs then publish, arrive and read
late, which exposes a missing wait or a reused buffer. Threads share one interpreter lock, so
this is for correctness, never for timing.
"""
import contextlib
import inspect
import math
import random
import threading
import time

from triton.runtime import interpreter

JOIN_SECONDS = 600.0
"""Longest a launch may run before ``concurrent_grids`` reports a hang."""


@contextlib.contextmanager
def concurrent_grids(jitter: float = 0.0, seed: int = 0):
    """Run every interpreted launch inside the block with one thread per program."""
    local = threading.local()
    builder_class = interpreter.InterpreterBuilder
    saved = {name: builder_class.__dict__.get(name)
             for name in ("grid_idx", "create_atomic_rmw", "create_atomic_cas",
                          "create_masked_store", "create_masked_load")}
    call = interpreter.GridExecutor.__call__

    def get_index(builder):
        return getattr(local, "grid_idx", None)

    def set_index(builder, value):
        local.grid_idx = value

    def jittered(operation, when=lambda args: True):
        def run(builder, *args):
            pause = getattr(local, "pause", None) if when(args) else None
            if pause:
                pause()
            else:
                time.sleep(0)  # yield the interpreter lock: a polling program lets others run
            result = operation(builder, *args)
            if pause:
                pause()
            return result
        return run

    def concurrent_call(executor, *args, **kwargs):
        fn = executor.fn
        executor.fn = _Deferred(fn, lambda fn_args, indices: _run_threads(
            fn, fn_args, indices, local, jitter, seed))
        try:
            return call(executor, *args, **kwargs)
        finally:
            executor.fn = fn

    builder_class.grid_idx = property(get_index, set_index)
    # (rmw_op, ptr, val, mask, sem, scope): a poll adds 0 and is never slowed (a slow program
    # would count its wait in slow polls); (ptrs, mask, other, cache, is_volatile): only
    # volatile loads, which read what other programs wrote
    builder_class.create_atomic_rmw = jittered(builder_class.create_atomic_rmw,
                                               lambda args: bool(args[2].data.any()))
    builder_class.create_atomic_cas = jittered(builder_class.create_atomic_cas)
    builder_class.create_masked_store = jittered(builder_class.create_masked_store)
    builder_class.create_masked_load = jittered(builder_class.create_masked_load,
                                                lambda args: bool(args[-1]))
    device_call = interpreter.InterpretedFunction.__call__

    def nested_call(function, *args, **kwargs):
        # Triton re-patches triton.language at every call of a jitted helper (and never
        # restores it); the launch has patched it already: skip that, it is half the run time
        # and threads would race on it
        try:
            return function.rewrite()(*args, **kwargs)
        except Exception as error:
            raise interpreter.InterpreterError(repr(error)) from error

    interpreter.GridExecutor.__call__ = concurrent_call
    interpreter.InterpretedFunction.__call__ = nested_call
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = call
        interpreter.InterpretedFunction.__call__ = device_call
        for name, value in saved.items():
            if value is None:
                delattr(builder_class, name)
            else:
                setattr(builder_class, name, value)


class _Deferred:
    """Stands in for the kernel in the executor's loop over the grid: collects the grid
    indices and, at the last one, runs them all at once. Looks like the kernel to the executor
    (its signature, name and globals)."""

    def __init__(self, fn, run):
        self.__signature__ = inspect.signature(fn)
        self.__globals__ = fn.__globals__
        self.__name__ = fn.__name__
        self.run, self.indices = run, []

    def __call__(self, **fn_args):
        self.indices.append(interpreter.interpreter_builder.grid_idx)
        if len(self.indices) == math.prod(interpreter.interpreter_builder.grid_dim):
            self.run(fn_args, self.indices)


def _run_threads(fn, fn_args, indices, local, jitter, seed):
    """Run ``fn(**fn_args)`` once per grid index, each in its own thread; re-raise the first
    error; raise TimeoutError if a program is still running after JOIN_SECONDS."""
    errors = []

    def program(index, number):
        local.grid_idx = index
        rng = random.Random(seed * 1_000_003 + number)
        slowness = (number + seed) % len(indices) / max(len(indices) - 1, 1)
        local.pause = lambda: time.sleep((1 + rng.random()) / 2 * slowness * jitter)
        try:
            fn(**fn_args)
        except BaseException as error:  # noqa: BLE001 (re-raised in the launching thread)
            errors.append(error)

    threads = [threading.Thread(target=program, args=(index, number), daemon=True)
               for number, index in enumerate(indices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_SECONDS)
        if thread.is_alive():
            raise TimeoutError(f"an interpreted program is still running after {JOIN_SECONDS} s")
    if errors:
        raise errors[0]
