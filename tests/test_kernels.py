"""The fused Triton kernels against the reference (on CPU through Triton's interpreter).

Each case runs both launch-2 designs: the Gram scratch (keys in registers) and the streaming one
(keys in an O(B·N) scratch). Results must equal the reference; where a row differs, it must be a
genuine float near-tie of the float64 rule (``literal.replay``), else the test fails.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import zspaprune_ops
from literal import replay
from zspaprune_ops import kernels
from zspaprune_ops.blocked import select_batched as blocked_select
from zspaprune_ops.dispatch import implementation
from zspaprune_ops.kernels import fill
from zspaprune_ops.kernels.select import select_batched as kernel_select
from zspaprune_ops.reference.naive import select_batched as reference_select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = pytest.mark.parametrize("gram", [True, False], ids=["gram", "stream"])


def make_case(seed, B, N, D, T, dtype=torch.float32, *, visual_padding=False,
              prompt_padding=False, duplicates=False, zeros=False, nonfinite=False):
    """Fresh random features and masks on DEVICE; every row keeps at least N // 2 real tokens."""
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, N, D, generator=g)
    if duplicates and N > 2:  # distinct targets: repeated ones would race in index_put
        visual[:, torch.randperm(N, generator=g)[: N // 3]] = visual[
            :, torch.randint(0, N, (N // 3,), generator=g)]
    if zeros and N > 1:
        visual[:, torch.randint(0, N, (max(1, N // 10),), generator=g)] = 0.0
    if nonfinite and N > 3:
        visual[:, 1, 0] = math.nan
        visual[:, 2, -1] = math.inf
        visual[:, 3] = 3e19  # finite, but its float32 norm overflows: unscorable (fp16: inf)
    prompt = torch.randn(B, T, D, generator=g)
    prompt_mask = visual_mask = None
    if visual_padding:
        visual_mask = torch.rand(B, N, generator=g) < 0.7
        visual_mask[:, : (N + 1) // 2] = True
    if prompt_padding:
        prompt_mask = torch.rand(B, T, generator=g) < 0.6
        prompt_mask[0] = False  # a row without any real prompt token: pure diversity
    move = (lambda x: None if x is None else x.to(DEVICE))
    return (visual.to(DEVICE, dtype), prompt.to(DEVICE, dtype), move(prompt_mask),
            move(visual_mask))


def check(visual, prompt, keep, ratio, prompt_mask=None, visual_mask=None, *, gram):
    """Kernels vs reference: equal, or each differing row a float64 near-tie; returns picks."""
    kept = kernel_select(visual, prompt, keep, ratio, prompt_mask, visual_mask, gram=gram)
    expected = reference_select(visual, prompt, keep, ratio, prompt_mask, visual_mask)
    assert kept.dtype == torch.int64 and kept.shape == expected.shape
    assert kept.device == visual.device
    for b in torch.nonzero((kept != expected).any(dim=1)).flatten().tolist():
        replay(visual[b].cpu(), prompt[b].cpu(), keep, ratio, kept[b].cpu(),
               None if prompt_mask is None else prompt_mask[b].cpu(),
               None if visual_mask is None else visual_mask[b].cpu())
    return kept


CASES = [  # seed, B, N, D, T, keep, ratio, case options
    (0, 1, 1, 8, 3, 1, 0.5, {}),
    (1, 2, 2, 5, 4, 2, 0.0, {}),
    (2, 3, 37, 16, 5, 10, 0.5, dict(visual_padding=True, duplicates=True, zeros=True)),
    (3, 2, 100, 64, 9, 100, 0.3, dict(prompt_padding=True)),  # keep = N
    (4, 2, 70, 40, 40, 7, 1.0, dict(duplicates=True)),  # D and T over several chunks
    (5, 1, 130, 24, 3, 20, 0.25, dict(visual_padding=True, prompt_padding=True)),  # 3 tiles
    (6, 2, 20, 1100, 3, 6, 0.5, dict(zeros=True)),  # launch 1 splits the features in 3
]


@MODES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"N{c[2]}-keep{c[5]}-r{c[6]}" for c in CASES])
def test_matches_reference(case, dtype, gram):
    seed, B, N, D, T, keep, ratio, options = case
    visual, prompt, prompt_mask, visual_mask = make_case(seed, B, N, D, T, dtype, **options)
    keep = min(keep, N if visual_mask is None else int(visual_mask.sum(1).min()))
    check(visual, prompt, keep, ratio, prompt_mask, visual_mask, gram=gram)


@MODES
@pytest.mark.parametrize("N, D, keep, ratio, dtype", [(300, 32, 40, 0.5, torch.float16),
                                                      (1100, 16, 12, 0.0, torch.bfloat16)],
                         ids=["N300", "N1100"])
def test_larger_register_blocks_and_column_groups(N, D, keep, ratio, dtype, gram, monkeypatch):
    """Gram launch 2 with 1024 / 4096-token blocks (and launch 1 with many triangle tiles);
    streaming launch 1 with several column groups for the nearest-neighbour maxima (groups
    shrunk to 128 columns)."""
    from zspaprune_ops.kernels import select as module
    monkeypatch.setattr(module, "NEAREST_GROUP_COLS", 128)
    visual, prompt, _, visual_mask = make_case(N, 1, N, D, 7, dtype, visual_padding=True,
                                               duplicates=True)
    check(visual, prompt, keep, ratio, None, visual_mask, gram=gram)


@MODES
@pytest.mark.parametrize("D", [1, 6])
def test_exact_ties_go_to_the_lower_index(gram, D):
    """Power-of-two multiples of basis vectors: every cosine is exactly 0 or +-1 in any
    arithmetic, so ties are exact and must resolve like the reference's, lower index first."""
    g = torch.Generator().manual_seed(7)
    axis = torch.randint(0, D, (3, 24), generator=g)
    scale = 2.0 ** torch.randint(-3, 4, (3, 24), generator=g) * (1 - 2 * (axis % 2))
    visual = (torch.nn.functional.one_hot(axis, D) * scale[..., None]).to(DEVICE)
    prompt = torch.randn(3, 2, D, generator=g).to(DEVICE)
    for ratio in (0.0, 0.5, 1.0):
        kept = kernel_select(visual, prompt, 9, ratio, gram=gram)
        assert torch.equal(kept, reference_select(visual, prompt, 9, ratio))


@MODES
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_and_zero_features(dtype, gram):
    visual, prompt, _, visual_mask = make_case(11, 2, 29, 16, 4, dtype, zeros=True,
                                               nonfinite=True, visual_padding=True)
    for ratio in (0.0, 0.6, 1.0):
        kept = check(visual, prompt, 14, ratio, None, visual_mask, gram=gram)
        assert all(len(set(row)) == 14 for row in kept.tolist())


@MODES
def test_prompt_edge_cases(gram):
    visual, prompt, _, _ = make_case(12, 2, 23, 16, 5)
    prompt[1, 2, 3] = math.nan  # a NaN prompt: every relevance demoted, the row stays valid
    prompt_mask = torch.tensor([[False] * 5, [True] * 5], device=DEVICE)  # row 0: no prompt
    check(visual, prompt, 9, 0.5, prompt_mask, None, gram=gram)
    check(visual, prompt[:, :0], 9, 0.5, None, None, gram=gram)  # T = 0: pure diversity
    check(visual, torch.zeros_like(prompt), 9, 0.5, None, None, gram=gram)  # zero prompt


@MODES
def test_keep_beyond_the_real_tokens_takes_padded_ones_last(gram):
    """What runs when value checks are off and a row has fewer real tokens than keep."""
    visual, prompt, _, _ = make_case(19, 2, 30, 8, 4)
    visual_mask = torch.zeros(2, 30, dtype=torch.bool, device=DEVICE)
    visual_mask[:, ::5] = True  # 6 real tokens, keep 10
    for ratio in (0.0, 0.5):
        kept = kernel_select(visual, prompt, 10, ratio, None, visual_mask, gram=gram)
        assert torch.equal(kept, reference_select(visual, prompt, 10, ratio, None, visual_mask))


@MODES
def test_strided_mixed_dtype_inputs(gram):
    visual, prompt, prompt_mask, visual_mask = make_case(13, 2, 41, 48, 6, prompt_padding=True,
                                                         visual_padding=True)
    visual_t = visual.transpose(1, 2).contiguous().transpose(1, 2)  # feature stride != 1
    prompt_bf16 = prompt.to(torch.bfloat16)[:, ::2]  # another dtype, row stride 2 * D
    check(visual_t, prompt_bf16, 11, 0.5, prompt_mask[:, ::2], visual_mask[:, :], gram=gram)


@MODES
def test_repeated_runs_are_identical(gram):
    visual, prompt, prompt_mask, visual_mask = make_case(14, 2, 50, 16, 4, duplicates=True,
                                                         visual_padding=True)
    runs = [kernel_select(visual, prompt, 12, 0.5, prompt_mask, visual_mask, gram=gram)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_wrapper_triton_backend():
    visual, prompt, prompt_mask, visual_mask = make_case(15, 2, 33, 16, 5, torch.float16,
                                                         prompt_padding=True, visual_padding=True)
    kept = zspaprune_ops.select(visual, prompt, 9, 0.5, prompt_mask=prompt_mask,
                                visual_mask=visual_mask, backend="triton")
    assert torch.equal(kept, zspaprune_ops.select(visual, prompt, 9, 0.5, prompt_mask=prompt_mask,
                                                  visual_mask=visual_mask, backend="reference"))
    unbatched = zspaprune_ops.select(visual[1], prompt[1], 9, 0.0, backend="triton")
    assert unbatched.shape == (9,)
    assert torch.equal(unbatched, zspaprune_ops.reference.select(visual[1], prompt[1], 9, 0.0))


def test_dispatch_table():
    assert implementation("auto", torch.device("cuda")) is kernels.select_batched
    assert implementation("auto", torch.device("cpu")) is blocked_select
    assert implementation("blocked", torch.device("cuda")) is blocked_select
    assert implementation("reference", torch.device("cuda")) is reference_select
    assert implementation("triton", torch.device(DEVICE)) is kernels.select_batched
    with pytest.raises(ValueError, match="backend must be one of"):
        implementation("fused", torch.device("cpu"))


def test_triton_backend_on_cpu_needs_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, zspaprune_ops\n"
            "try:\n"
            "    zspaprune_ops.select(torch.randn(5, 4), torch.randn(2, 4), 2, backend='triton')\n"
            "except RuntimeError as error:\n"
            "    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr


@pytest.fixture
def op_runs_kernels(monkeypatch):
    """Route the op's ``auto`` dispatch to the kernels on this device too (on CUDA it already
    does): the op then runs the Triton kernels under opcheck and torch.compile on CPU."""
    monkeypatch.setattr("zspaprune_ops.op.implementation",
                        lambda backend, device: kernels.select_batched)


def test_op_with_kernels_passes_opcheck(op_runs_kernels):
    visual, prompt, prompt_mask, visual_mask = make_case(16, 2, 21, 16, 4, prompt_padding=True,
                                                         visual_padding=True)
    torch.library.opcheck(torch.ops.zspaprune.select.default,
                          (visual, prompt, 6, 0.5, prompt_mask, visual_mask))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_op_with_kernels_compiles_fullgraph(op_runs_kernels, dynamic):
    def prune(visual, prompt, prompt_mask, visual_mask):
        kept = torch.ops.zspaprune.select(visual, prompt, 6, 0.5, prompt_mask, visual_mask)
        return torch.gather(visual, 1, kept[..., None].expand(-1, -1, visual.shape[2])) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(prune, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for seed, N in [(17, 21), (18, 26)]:
        args = make_case(seed, 2, N, 16, 4, prompt_padding=True, visual_padding=True)
        assert torch.equal(compiled(*args), prune(*args))


def test_cooperative_grid_fits_the_gpu(monkeypatch):
    """The streaming launch 2 is a cooperative grid: B * parts programs must be resident at
    once, so parts <= SMs * programs per SM (the compiled kernel's occupancy) / B, and at most
    one program per SM per image; 1 program per image off CUDA."""
    from types import SimpleNamespace

    from zspaprune_ops.kernels import select as module
    assert module.stream_parts(8, 32768, torch.device("cpu")) == 1
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert module.stream_parts(8, 32768, cuda) == 16
    assert module.stream_parts(8, 32768, cuda, per_sm=4) == 66
    assert module.stream_parts(1, 32768, cuda, per_sm=4) == 132
    assert module.stream_parts(200, 32768, cuda) == 1
    blocks = math.ceil(100 / module.STREAM_BLOCK_N)
    assert module.stream_parts(1, 100, cuda) == blocks  # never more parts than token blocks
    monkeypatch.setattr(module, "COOPERATIVE", False)
    assert module.stream_parts(8, 32768, cuda) == 1


def test_occupancy_from_the_compiled_kernel(monkeypatch):
    """Programs per SM as CUDA allocates registers (per warp, in units of 256), threads and
    shared memory; 1 where the kernel's fields cannot be read."""
    from types import SimpleNamespace

    from zspaprune_ops.kernels import select as module
    props = SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                            shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def kernel(regs, warps, shared):
        return SimpleNamespace(_init_handles=lambda: None, n_regs=regs,
                               metadata=SimpleNamespace(num_warps=warps, shared=shared))

    assert module._programs_per_sm(kernel(40, 4, 0)) == 12  # registers: 65536 / (1280 * 4)
    assert module._programs_per_sm(kernel(32, 4, 0)) == 16  # threads: 2048 / 128
    assert module._programs_per_sm(kernel(32, 4, 100000)) == 2  # shared memory
    assert module._programs_per_sm(SimpleNamespace()) == 1


def scratch_bytes(monkeypatch, B, N, D, T, keep, ratio):
    """Bytes select_batched allocates for a shape, on the meta device with launches stubbed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from zspaprune_ops.kernels import select as module

    class NoLaunch:  # kernel[grid](...) does nothing: only the host side's allocations run
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for name in ("_prompt_kernel", "_prepare_kernel", "_select_gram_kernel",
                 "_select_stream_kernel"):
        monkeypatch.setattr(module, name, NoLaunch())
    allocated = []

    class CountAllocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default):
                allocated.append(out.numel() * out.element_size())
            return out

    visual = torch.empty(B, N, D, dtype=torch.bfloat16, device="meta")
    prompt = torch.empty(B, T, D, dtype=torch.bfloat16, device="meta")
    masks = (torch.empty(B, T, dtype=torch.bool, device="meta"),
             torch.empty(B, N, dtype=torch.bool, device="meta"))
    with CountAllocations():
        module.select_batched(visual, prompt, keep, ratio, *masks)
    return sum(allocated)


def test_extra_memory_at_n32768_b8_is_far_under_1gb(monkeypatch):
    """The issue's bound: N = 32768 at B = 8 (D = 4096, keep 10%, masks, a DivPrune start)."""
    assert scratch_bytes(monkeypatch, 8, 32768, 4096, 64, 3276, 0.0) < 100 * 2**20
    # the count sees the scratch: LLaVA-1.5's shape uses the [B, N, N] float32 Gram matrix
    assert scratch_bytes(monkeypatch, 1, 576, 4096, 64, 64, 0.5) >= 576 * 576 * 4


NONFINITE = {
    "finite": lambda visual, prompt: None,
    "nan-prompt": lambda visual, prompt: prompt[:, 0, 0].fill_(math.nan),
    "inf-prompt": lambda visual, prompt: prompt[:, -1, 1].fill_(math.inf),
}
NONFINITE_TOKENS = {
    "finite": lambda visual: None,
    "nan-token": lambda visual: visual[:, 0, 0].fill_(math.nan),
    "inf-tokens": lambda visual: (visual[:, 3, 2].fill_(-math.inf), visual[:, 9, 0].fill_(math.inf)),
}


@MODES
@pytest.mark.parametrize("masks", [False, True], ids=["no-masks", "masks"])
@pytest.mark.parametrize("tokens", list(NONFINITE_TOKENS))
@pytest.mark.parametrize("prompt_case", list(NONFINITE))
def test_nonfinite_prompt_and_tokens_equal_the_reference(prompt_case, tokens, masks, gram):
    """Every combination of a non-finite prompt, non-finite tokens and masks, both modes: the
    picks equal the reference's exactly (NaN relevance is demoted, not clamped into range).
    The issue's case: N=16, D=64, T=3, NaN in prompt[0, 0, 0] and visual[0, 0, 0]."""
    g = torch.Generator().manual_seed(0)
    visual, prompt = torch.randn(2, 16, 64, generator=g), torch.randn(2, 3, 64, generator=g)
    NONFINITE[prompt_case](visual, prompt)
    NONFINITE_TOKENS[tokens](visual)
    prompt_mask = visual_mask = None
    if masks:
        prompt_mask = torch.tensor([[True, False, True], [False, True, True]])
        visual_mask = torch.ones(2, 16, dtype=torch.bool)
        visual_mask[:, 12:] = False
    visual, prompt = visual.to(DEVICE), prompt.to(DEVICE)
    prompt_mask, visual_mask = (None if m is None else m.to(DEVICE) for m in (prompt_mask, visual_mask))
    for keep, ratio in ((4, 1.0), (4, 0.5), (7, 0.0), (12, 0.5)):
        kept = kernel_select(visual, prompt, keep, ratio, prompt_mask, visual_mask, gram=gram)
        assert torch.equal(kept, reference_select(visual, prompt, keep, ratio, prompt_mask,
                                                  visual_mask)), (keep, ratio)


def test_the_issues_nan_case_gives_the_references_picks():
    g = torch.Generator().manual_seed(0)
    visual, prompt = torch.randn(1, 16, 64, generator=g), torch.randn(1, 3, 64, generator=g)
    prompt[0, 0, 0] = visual[0, 0, 0] = math.nan
    for gram in (True, False):
        assert kernel_select(visual, prompt, 4, 1.0, gram=gram).tolist() == [[0, 1, 2, 3]]
        assert torch.equal(kernel_select(visual, prompt, 4, 0.5, gram=gram),
                           reference_select(visual, prompt, 4, 0.5))


@MODES
def test_offsets_past_2_31_elements(gram):
    """Row offsets row * stride >= 2^31 elements (a long video: N * D >= 2^31) need 64-bit
    address arithmetic. Rows 2^22 + 8 elements apart in an untouched 4.4 GB float16 buffer
    (only the rows' 8 features are ever written) reach 2.2e9 elements at row 519."""
    N, D, stride = 520, 8, (1 << 22) + 8
    base = torch.empty(N * stride, dtype=torch.float16, device=DEVICE)
    visual = base.as_strided((1, N, D), (N * stride, stride, 1))
    g = torch.Generator().manual_seed(3)
    visual.copy_(torch.randn(1, N, D, generator=g).to(DEVICE, torch.float16))
    prompt = torch.randn(1, 2, D, generator=g).to(DEVICE, torch.float16)
    assert (N - 1) * stride >= 2**31
    for keep, ratio in ((5, 0.4), (3, 0.0)):
        kept = kernel_select(visual, prompt, keep, ratio, gram=gram)
        assert torch.equal(kept, reference_select(visual.contiguous(), prompt, keep, ratio))


def test_large_batches_run_in_gram_chunks(monkeypatch):
    """A batch whose [B, N, N] Gram scratch would pass GRAM_MAX_BYTES runs in chunks of images
    (not the much slower streaming mode): the same picks as the reference, masks included."""
    from zspaprune_ops.kernels import select as module
    monkeypatch.setattr(module, "GRAM_MAX_BYTES", 2 * 30 * 30 * 4)  # 2 images per chunk
    assert module.gram_chunk(5, 30) == 2 and module.uses_gram(30)
    visual, prompt, prompt_mask, visual_mask = make_case(21, 5, 30, 16, 4, prompt_padding=True,
                                                         visual_padding=True)
    check(visual, prompt, 8, 0.5, prompt_mask, visual_mask, gram=None)


def multipick_tokens(kind, N, D, g):
    """[1, N, D] tokens of one kind: random, clustered (8 tight clusters), duplicate-heavy (N
    tokens drawn from 40 distinct ones) or tie-heavy (integer features in {-1, 0, 1}: many
    exactly equal distances)."""
    if kind == "random":
        return torch.randn(1, N, D, generator=g)
    if kind == "clustered":
        centres = torch.randn(8, D, generator=g)
        return (centres[torch.randint(0, 8, (N,), generator=g)]
                + 0.2 * torch.randn(N, D, generator=g))[None]
    if kind == "duplicates":
        return torch.randn(40, D, generator=g)[torch.randint(0, 40, (N,), generator=g)][None]
    return torch.randint(-1, 2, (1, N, D), generator=g).float()


@pytest.mark.parametrize("ratio", [0.0, 0.5])
@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates", "ties"])
def test_multi_pick_passes_equal_the_one_at_a_time_rule(kind, ratio, monkeypatch):
    """The streaming launch 2 confirms several picks per pass over the features; Gram mode makes
    one pick per step. The streaming picks are exactly the float64 rule's (ties to the lower
    index, no tolerance beyond float64 rounding) on random, clustered, duplicate-heavy and
    tie-heavy tokens (keep within the 40 distinct tokens of the duplicate-heavy kind: beyond
    them every key is a float32 rounding of 0); Gram mode's equal them except on duplicates.
    Random and clustered tokens also match the float32 reference; with duplicates it can break
    a tie by BLAS rounding (its einsum rounds equal rows differently at different positions),
    which the float64 rule does not."""
    from zspaprune_ops.kernels import select as module
    g = torch.Generator().manual_seed(len(kind) * 10 + int(ratio * 2))
    N, keep = 150, 36
    visual = multipick_tokens(kind, N, 16, g)
    prompt = torch.randn(1, 3, 16, generator=g)
    launches = []  # (sync words, programs per image): word 0 counts the barriers passed
    launch = module._launch_stream

    def recorded(args, *rest):
        launches.append((args[8], launch(args, *rest)))
        return launches[-1][1]

    monkeypatch.setattr(module, "_launch_stream", recorded)
    kept = kernel_select(visual.to(DEVICE), prompt.to(DEVICE), keep, ratio, gram=False).cpu()
    one_at_a_time = kernel_select(visual.to(DEVICE), prompt.to(DEVICE), keep, ratio,
                                  gram=True).cpu()
    replay(visual[0], prompt[0], keep, ratio, kept[0], tol=1e-12)
    if kind == "duplicates":
        # Gram mode's tl.dot is a BLAS matmul under the interpreter, which rounds equal rows
        # differently at different positions: of two copies of a token it may take the later
        # one. Taking a copy changes no later distance, so it keeps the same tokens.
        copy_of = {}
        token = [copy_of.setdefault(tuple(row.tolist()), len(copy_of)) for row in visual[0]]
        assert (sorted(token[i] for i in one_at_a_time[0].tolist())
                == sorted(token[i] for i in kept[0].tolist()))
    else:
        assert torch.equal(kept, one_at_a_time)
    if kind in ("random", "clustered"):
        assert torch.equal(kept, reference_select(visual, prompt, keep, ratio))
    sync, parts = launches[0]  # one barrier per pass and a last one: several picks per pass
    passes = int(sync[0, 0]) // parts - 1
    assert math.ceil(keep / module.STREAM_CANDIDATES) <= passes < keep * 2 // 3


@triton.jit
def _top_merge_kernel(top_ptr, packed_ptr, out_ptr, K: tl.constexpr, M: tl.constexpr,
                      INTERPRETED: tl.constexpr):
    merged = fill._top_merge(tl.load(top_ptr + tl.arange(0, K)),
                             tl.load(packed_ptr + tl.arange(0, M)), INTERPRETED)
    tl.store(out_ptr + tl.arange(0, K), merged)


@triton.jit
def _candidates_kernel(lists_ptr, cand_ptr, bound_ptr, P, CAND: tl.constexpr,
                       INTERPRETED: tl.constexpr):
    cand, bound = fill._candidates(lists_ptr, P, CAND, 2, INTERPRETED)
    tl.store(cand_ptr + tl.arange(0, CAND), cand)
    tl.store(bound_ptr, bound)


def run_top_merge(top, packed, interpreted):
    out = torch.empty_like(top)
    _top_merge_kernel[(1,)](top, packed, out, K=len(top), M=len(packed),
                            INTERPRETED=interpreted)
    return out


NONE = -(2 ** 63)


@pytest.mark.parametrize("interpreted", [False, True], ids=["topk", "ranks"])
def test_top_merge_keeps_the_largest(interpreted):
    """Both forms of the list merge (Triton's bitonic topk on the GPU, ranks in the
    interpreter): the K largest of a list and new values, empty slots (``NONE``) last."""
    if DEVICE == "cuda" and interpreted:
        pytest.skip("the rank form is for Triton's interpreter")
    g = torch.Generator().manual_seed(5)
    values = torch.randperm(1 << 20, generator=g)[:96].long() * 7919 - (1 << 23)
    top = values[:16].clone()
    top[10:] = NONE  # a list not yet full
    packed = values[16:80]
    merged = run_top_merge(top.to(DEVICE), packed.to(DEVICE), interpreted).cpu()
    union = torch.cat([top, packed])
    assert torch.equal(merged.sort(descending=True).values, union.topk(16).values)
    few = torch.full((32,), NONE, dtype=torch.long)
    few[[3, 9]] = values[90:92]  # fewer values than slots: the rest stays NONE
    merged = run_top_merge(torch.full((16,), NONE).to(DEVICE), few.to(DEVICE), interpreted).cpu()
    assert torch.equal(merged.sort(descending=True).values, few.topk(16).values)


@pytest.mark.parametrize("P", [1, 3, 7])
def test_candidates_and_their_bound_from_every_program_list(P):
    """The merge of the P programs' lists (several loads of CHUNK = 2 lists): the CAND largest
    packed keys of all lists are the candidates; the bound is the largest of the rest."""
    g = torch.Generator().manual_seed(P)
    lists = (torch.randperm(1 << 20, generator=g)[:P * 32].long() - (1 << 19)).view(P, 32)
    lists[0, 20:] = NONE  # a short slice: its list is not full
    cand, bound = torch.empty(16, dtype=torch.long), torch.empty(1, dtype=torch.long)
    cand, bound, lists = cand.to(DEVICE), bound.to(DEVICE), lists.to(DEVICE)
    _candidates_kernel[(1,)](lists, cand, bound, P, CAND=16,
                             INTERPRETED=kernels.select._interpreted())
    ranked = lists.flatten().sort(descending=True).values.cpu()
    assert torch.equal(cand.cpu().sort(descending=True).values, ranked[:16])
    assert int(bound) == int(ranked[16])
