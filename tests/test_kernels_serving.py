"""What a server meets with the fused kernels (kernels issue v3): a refused cooperative launch,
a failed image whatever the value-check setting, rows -1 until written, and a bounded set of
compiled variants for any N, keep, T and batch (under Triton's interpreter on the CPU)."""
import warnings

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime import interpreter
from triton.runtime.jit import JITFunction, create_function_from_signature

import zspaprune_ops
from test_kernels import DEVICE, make_case
from zspaprune_ops.kernels import fill, prepare
from zspaprune_ops.kernels import select as module
from zspaprune_ops.testing.interpreter import concurrent_grids

pytestmark = pytest.mark.skipif(DEVICE == "cuda", reason="Triton's interpreter only")


class Launches(list):
    refuse_above = None


@pytest.fixture
def launches(monkeypatch):
    """Every interpreted launch as (kernel, grid, args, kwargs); ``refuse_above`` (set on the
    list) makes a cooperative launch of more programs fail as the CUDA driver does."""
    recorded = Launches()
    run = interpreter.InterpretedFunction.run

    def recording(kernel, *args, grid, warmup, **kwargs):
        recorded.append((kernel, grid, args, kwargs))
        if (kwargs.get("launch_cooperative_grid") and recorded.refuse_above is not None
                and grid[0] * grid[1] > recorded.refuse_above):
            raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
        return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording)
    return recorded


def test_a_refused_cooperative_launch_tries_fewer_programs_and_warns_once(launches,
                                                                         monkeypatch):
    """A driver that refuses more than 5 programs: 8 per image, then 4 (which runs), one
    warning per process, and the picks of one program per image."""
    monkeypatch.setattr(module, "_warned", [])
    launches.refuse_above = 5
    visual, prompt, _, _ = make_case(30, 1, 90, 8, 3)
    alone = module.select_batched(visual, prompt, 12, 0.5, gram=False, parts=1)
    with warnings.catch_warnings(record=True) as caught, concurrent_grids():
        warnings.simplefilter("always")
        for _ in range(2):
            launches.clear()
            kept = module.select_batched(visual, prompt, 12, 0.5, gram=False, parts=8)
            assert torch.equal(kept, alone)
            streaming = [grid for kernel, grid, _, _ in launches
                         if kernel.__name__ == "_select_stream_kernel"]
            assert streaming == [(8, 1), (4, 1)]
    refused = [w for w in caught if "refused a cooperative grid" in str(w.message)]
    assert len(refused) == 1 and refused[0].category is RuntimeWarning


def test_a_failed_image_raises_whatever_the_value_checks(launches, monkeypatch):
    """Forced P = 2 under the sequential interpreter, which runs program 0 to its end before
    program 1 starts: program 0's first wait times out (BARRIER_TIMEOUT_S, in polls of 0.1 ms
    there). Both images fail; their rows are all -1 (never partly written, never an index
    outside [0, N)), and, value checks on or off, the call raises (a caller gathering with the
    rows would read the last token)."""
    monkeypatch.setattr(module, "BARRIER_TIMEOUT_S", 0.02)
    visual, prompt, _, _ = make_case(22, 2, 40, 8, 3)
    for checks in (True, False):
        launches.clear()
        previous = zspaprune_ops.set_value_checks(checks)
        try:
            with pytest.raises(RuntimeError, match=r"failed for images \[0, 1\]"):
                module.select_batched(visual, prompt, 5, 0.5, gram=False, parts=2)
        finally:
            zspaprune_ops.set_value_checks(previous)
        picks = next(args[9] for kernel, _, args, _ in launches
                     if kernel.__name__ == "_select_stream_kernel")
        assert torch.equal(picks, torch.full((2, 5), -1))


def test_rows_are_minus_one_until_launch_2_writes_them():
    """Launch 0 writes -1 over every output row (keep past its 256-wide block too): a row that
    launch 2 leaves unwritten can never hold stale memory."""
    prompt = torch.randn(2, 3, 40)
    out = torch.full((2, 300), 7, dtype=torch.int64)
    psum, counts = torch.empty(2, 40), torch.empty(2, dtype=torch.int32)
    sync = torch.full((2, 1), 9, dtype=torch.int64)
    prepare._prompt_kernel[(2, 2)](prompt, psum, psum, counts, sync, out, 3, 40, 0, 300,
                                   *prompt.stride()[:2], 0, 0, HAS_PMASK=False, BD=32, BT=256)
    assert torch.equal(out, torch.full_like(out, -1))
    assert torch.allclose(psum, prompt.sum(1)) and counts.tolist() == [3, 3]


def specialization_keys(records) -> set:
    """The key Triton's JIT compiles under for each recorded launch on sm_90: the kernel, the
    type and specialization (alignment, divisibility by 16, equality to 1) of every argument,
    the constexprs and the launch options."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders, keys = {}, set()
    for kernel, _, args, kwargs in records:
        if kernel not in binders:
            names = ("do_not_specialize", "do_not_specialize_on_alignment")
            jit = JITFunction(kernel.fn, **{k: kernel.kwargs[k] for k in names})
            binders[kernel] = create_function_from_signature(jit.signature, jit.params, backend)
        _, specialization, options = binders[kernel](*args, **kwargs)
        keys.add((kernel.__name__, repr(specialization), repr(sorted(options.items()))))
    return keys


def test_any_shape_compiles_only_the_warmed_up_variants(launches, monkeypatch):
    """``kernels.warmup`` launches every variant of a feature dtype and size; then calls of
    other N, keep, T, batch sizes, ratios, masks, Gram chunks, odd B·N (scratch views at odd
    offsets) and an unaligned, strided input reuse its variants: no compile while serving."""
    calls = module.warmup(torch.device("cpu"), torch.float32, 16)
    warmed = specialization_keys(launches)
    assert calls == 24 and len(warmed) == len({key[:2] for key in warmed})
    assert {name for name, _, _ in warmed} == {"_prompt_kernel", "_prepare_kernel",
                                               "_select_gram_kernel", "_select_stream_kernel"}
    launches.clear()
    monkeypatch.setattr(module, "GRAM_MAX_BYTES", 2 * 37 * 37 * 4)  # chunks of 2 images
    for seed, (B, N, T, keep, ratio, options, gram) in enumerate([
            (3, 37, 5, 7, 0.5, dict(visual_padding=True, prompt_padding=True), None),
            (1, 1, 1, 1, 1.0, {}, None),
            (2, 130, 16, 16, 0.0, {}, None),
            (3, 37, 4, 3, 0.3, dict(prompt_padding=True), False),
            (1, 300, 2, 9, 0.5, dict(visual_padding=True), None),
            (2, 67, 33, 17, 1.0, {}, False)]):
        visual, prompt, prompt_mask, visual_mask = make_case(seed, B, N, 16, T, **options)
        if seed == 3:  # an unaligned start (copied) and a strided prompt
            visual = torch.randn(B * N * 16 + 1)[1:].view(B, N, 16)
            prompt = torch.randn(B, 2 * T, 16)[:, ::2]
        module.select_batched(visual, prompt, keep, ratio, prompt_mask, visual_mask, gram=gram)
    assert specialization_keys(launches) <= warmed


def test_scratch_views_are_aligned_for_odd_sizes(launches):
    """B·N odd: every scratch view the kernels get is 16-byte aligned (views start at
    multiples of 128 bytes from the allocation's start)."""
    visual, prompt, prompt_mask, visual_mask = make_case(5, 3, 37, 24, 5, visual_padding=True,
                                                         prompt_padding=True)
    for gram in (True, False):
        module.select_batched(visual, prompt, 6, 0.0, prompt_mask, visual_mask, gram=gram)
    masks = {prompt_mask.data_ptr(), visual_mask.data_ptr()}
    pointers = [arg.data_ptr() for _, _, args, _ in launches for arg in args
                if isinstance(arg, torch.Tensor) and arg.data_ptr() not in masks]
    assert pointers and all(pointer % 16 == 0 for pointer in pointers)


@triton.jit
def _wait_kernel(sync_ptr, ok_ptr, P, wait_us, OK: triton.language.constexpr):
    ok = fill._grid_wait(sync_ptr, P, 0, triton.language.full([], OK, triton.language.int1),
                         wait_us, True)
    triton.language.store(ok_ptr, ok.to(triton.language.int32))


def wait_once(P, wait_us, ok=True):
    sync, passed = torch.zeros(1, dtype=torch.int64), torch.full((1,), 7, dtype=torch.int32)
    _wait_kernel[(1,)](sync, passed, P, wait_us, OK=ok)
    return bool(passed), int(sync) & fill._ARRIVALS.value, bool(int(sync) & fill._FAILED.value)


def test_a_timeout_as_the_last_arrival_lands_is_not_a_failure(monkeypatch):
    """One program of two waits with a zero timeout: alone it fails the image (the failure bit,
    False). If the other program's arrival lands between its timeout and its flag (here: just
    before its compare-and-swap), the barrier passes for both and nothing is flagged."""
    assert wait_once(2, 0) == (False, 1, True)
    cas = interpreter.InterpreterBuilder.create_atomic_cas

    def late_arrival(builder, ptr, cmp, val, sem, scope):
        interpreter.InterpreterBuilder.create_atomic_rmw(
            builder, interpreter._ir.ATOMIC_OP.ADD, ptr, builder.get_int64(1),
            builder.get_int1(True), sem, scope)
        return cas(builder, ptr, cmp, val, sem, scope)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_cas", late_arrival)
    assert wait_once(2, 0) == (True, 2, False)


def test_a_program_that_failed_before_a_barrier_fails_it_for_everyone():
    """``ok`` already False: the failure bit is set before the arrival, so even a barrier whose
    arrivals are complete (P = 1) does not pass."""
    assert wait_once(1, 10**6, ok=False) == (False, 1, True)
    assert wait_once(1, 10**6) == (True, 1, False)


def test_a_samples_prompt_is_gathered_once_for_all_its_items():
    """The LLaVA path passes an explicit prompt mask: the sample's masked tokens are gathered
    (a boolean index: a host sync on CUDA) once and shared by all its images, not once per
    image."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from zspaprune_ops.models.sequence import item_prompts
    input_ids = torch.arange(12)[None]
    placeholders = torch.zeros(1, 12, dtype=torch.bool)
    placeholders[0, 2:8] = True  # three images of two tokens
    embeds = torch.randn(1, 12, 4)
    gathers = []

    class CountGathers(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.index.Tensor:
                gathers.append(func)
            return func(*args, **(kwargs or {}))

    with CountGathers():
        prompts = item_prompts(input_ids, torch.ones_like(input_ids),
                               torch.ones(1, 12, dtype=torch.bool), embeds, placeholders,
                               [(0, 2), (0, 4), (0, 6)], None, "")
    assert len(gathers) == 1 and all(p is prompts[0] for p in prompts)
    assert torch.equal(prompts[0], embeds[0, ~placeholders[0]])
