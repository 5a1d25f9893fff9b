"""The blocked CPU path (zspaprune_ops.blocked) against the reference and the float64 rule.

Every result must equal the reference's, or each differing row must be a genuine float
near-tie of the float64 rule (``literal.replay``). Inputs are fresh random draws; where tokens
repeat, ``keep`` stays within the distinct real tokens (beyond them every key is a float32
rounding of 0, which the float64 rule sees as exact ties).
"""
import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zspaprune_ops
from literal import replay
from test_reference import random_case
from zspaprune_ops.blocked import CANDIDATES, first_copies, select_batched
from zspaprune_ops.reference.naive import select_batched as reference_select

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def distinct_real(visual, visual_mask):
    """Fewest distinct real tokens in a row (bitwise)."""
    counts = []
    for b in range(visual.shape[0]):
        rows = visual[b] if visual_mask is None else visual[b][visual_mask[b]]
        counts.append(len(torch.unique(rows.float(), dim=0)))
    return min(counts)


def check(visual, prompt, keep, ratio, prompt_mask=None, visual_mask=None):
    """Blocked vs reference: equal, or each differing row a float64 near-tie; returns picks."""
    kept = select_batched(visual, prompt, keep, ratio, prompt_mask, visual_mask)
    expected = reference_select(visual, prompt, keep, ratio, prompt_mask, visual_mask)
    assert kept.dtype == torch.int64 and kept.shape == expected.shape
    for b in torch.nonzero((kept != expected).any(dim=1)).flatten().tolist():
        replay(visual[b], prompt[b], keep, ratio, kept[b],
               None if prompt_mask is None else prompt_mask[b],
               None if visual_mask is None else visual_mask[b])
    return kept


CASES = [  # seed, B, N, D, T, keep, ratio, case options
    (0, 1, 1, 8, 3, 1, 0.5, {}),
    (1, 2, 2, 5, 4, 2, 0.0, {}),
    (2, 3, 7, 1, 2, 4, 0.5, {}),  # D = 1: every cosine is +-1, ties everywhere
    (3, 3, 37, 16, 5, 10, 0.5, dict(visual_padding=True, duplicates=True, zeros=True)),
    (4, 2, 100, 64, 9, 100, 0.3, dict(prompt_padding=True)),  # keep = N
    (5, 2, 70, 40, 40, 7, 1.0, dict(duplicates=True)),
    (6, 1, 130, 24, 3, 20, 0.25, dict(visual_padding=True, prompt_padding=True)),
    (7, 2, 577, 96, 300, 64, 0.5, dict(prompt_padding=True)),  # T over two prompt blocks
    (8, 1, 2880, 32, 25, 288, 0.5, {}),
    (9, 1, 200, 4096, 64, 30, 0.5, dict(duplicates=True)),
    (10, 2, 301, 33, 6, 290, 0.0, {}),  # more picks than one column block of the core
    (11, 2, 60, 12, 6, 3, 1 / 6, {}),  # 3/6 + 0.5 = 1.0
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"N{c[2]}-D{c[3]}-keep{c[5]}-r{c[6]:.2f}"
                                             for c in CASES])
def test_matches_reference_and_the_float64_rule(case, dtype):
    seed, B, N, D, T, keep, ratio, options = case
    visual, prompt, prompt_mask, visual_mask = random_case(seed, B, N, D, T, dtype, **options)
    if options.get("duplicates") or options.get("zeros") or D == 1:
        keep = min(keep, distinct_real(visual, visual_mask))
    elif visual_mask is not None:
        keep = min(keep, int(visual_mask.sum(1).min()))
    check(visual, prompt, keep, ratio, prompt_mask, visual_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(8))
def test_random_sizes_masks_duplicates_and_zeros(seed, dtype):
    g = torch.Generator().manual_seed(1000 + seed)
    N, D = int(torch.randint(2, 400, (1,), generator=g)), int(torch.randint(1, 80, (1,), generator=g))
    ratio = float(torch.rand(1, generator=g)) if seed % 3 else 0.0
    visual, prompt, prompt_mask, visual_mask = random_case(
        seed, 3, N, D, 7, dtype, visual_padding=seed % 2 == 0, prompt_padding=seed % 4 == 0,
        duplicates=True, zeros=seed % 2 == 1)
    keep = int(torch.randint(1, distinct_real(visual, visual_mask) + 1, (1,), generator=g))
    check(visual, prompt, keep, ratio, prompt_mask, visual_mask)


def tokens(kind, N, D, g):
    """[1, N, D] tokens: random, clustered (8 tight clusters), duplicate-heavy (drawn from 40
    distinct ones) or tie-heavy (integer features in {-1, 0, 1})."""
    if kind == "random":
        return torch.randn(1, N, D, generator=g)
    if kind == "clustered":
        centres = torch.randn(8, D, generator=g)
        return (centres[torch.randint(0, 8, (N,), generator=g)]
                + 0.2 * torch.randn(N, D, generator=g))[None]
    if kind == "duplicates":
        return torch.randn(40, D, generator=g)[torch.randint(0, 40, (N,), generator=g)][None]
    return torch.randint(-1, 2, (1, N, D), generator=g).float()


class CountProducts(TorchDispatchMode):
    """Counts matrix products with ``rows`` output rows (the passes over all tokens)."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.count = rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default and out.shape[0] == self.rows:
            self.count += 1
        return out


@pytest.mark.parametrize("ratio", [0.0, 0.5])
@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates", "ties"])
def test_multi_pick_passes_are_the_one_at_a_time_rule(kind, ratio):
    """The picks are exactly the float64 rule's (tolerance 1e-12: float64 rounding only) on
    random, clustered, duplicate-heavy and tie-heavy tokens; random and clustered ones also
    equal the reference exactly. Each fill pass confirms several picks, except where copies
    of one token fill the candidates (duplicate-heavy: at most a pass per pick)."""
    g = torch.Generator().manual_seed(len(kind) * 10 + int(ratio * 2))
    N, keep = 600, 36
    visual, prompt = tokens(kind, N, 16, g), torch.randn(1, 3, 16, generator=g)
    with CountProducts(N) as products:
        kept = select_batched(visual, prompt, keep, ratio)
    replay(visual[0], prompt[0], keep, ratio, kept[0], tol=1e-12)
    if kind in ("random", "clustered"):
        assert torch.equal(kept, reference_select(visual, prompt, keep, ratio))
    fill = keep - math.floor(keep * ratio + 0.5)
    passes = products.count  # one product over all tokens per pass (+1: the core, or DivPrune)
    most = fill + 1 if kind == "duplicates" else fill // 2
    assert math.ceil(fill / CANDIDATES) <= passes <= most, passes


@pytest.mark.parametrize("D", [1, 6])
def test_exact_ties_go_to_the_lower_index(D):
    """Power-of-two multiples of basis vectors: every cosine is exactly 0 or +-1, so ties are
    exact and must resolve like the reference's, lower index first."""
    g = torch.Generator().manual_seed(7)
    axis = torch.randint(0, D, (3, 24), generator=g)
    scale = 2.0 ** torch.randint(-3, 4, (3, 24), generator=g) * (1 - 2 * (axis % 2))
    visual = torch.nn.functional.one_hot(axis, D) * scale[..., None]
    prompt = torch.randn(3, 2, D, generator=g)
    for ratio in (0.0, 0.5, 1.0):
        for keep in (1, 9, 24):
            assert torch.equal(select_batched(visual, prompt, keep, ratio),
                               reference_select(visual, prompt, keep, ratio))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_copies_go_to_the_lower_index(ratio):
    """Token i and i + 5k are identical, at positions where BLAS rounds equal rows differently
    (N = 577, D = 4096): the lower-indexed copies go first."""
    g = torch.Generator().manual_seed(3)
    visual = torch.randn(1, 577, 4096, generator=g)
    visual[0, 5:] = visual[0, :5].repeat(116, 1)[:572]
    prompt = torch.randn(1, 3, 4096, generator=g)
    kept = select_batched(visual, prompt, 8, ratio)
    replay(visual[0], prompt[0], 8, ratio, kept[0])
    for i in kept[0].tolist():  # of identical tokens, the lower-indexed copies go first
        assert i < 5 or i - 5 in kept[0].tolist()
    if ratio == 0.0:  # the fill never takes a copy while a new token remains
        assert kept[0].tolist()[:5] == [0, 1, 2, 3, 4]


def test_first_copies():
    x = torch.randn(9, 40)
    assert first_copies(x) is None
    x[[4, 7]] = x[2].clone()
    x[8] = x[5]
    x[[1, 3], 0] = math.nan  # equal bits, NaN included
    x[3] = x[1]
    assert first_copies(x).tolist() == [0, 1, 2, 1, 2, 5, 6, 2, 5]
    same_samples = torch.zeros(6, 64)  # equal on every sampled feature, unequal elsewhere
    same_samples[:, 1] = torch.tensor([1.0, 2.0, 1.0, 3.0, 2.0, 1.0])
    assert first_copies(same_samples.bfloat16()).tolist() == [0, 1, 0, 3, 1, 0]


NONFINITE_PROMPT = {
    "finite": lambda prompt: None,
    "nan-prompt": lambda prompt: prompt[:, 0, 0].fill_(math.nan),
    "inf-prompt": lambda prompt: prompt[:, -1, 1].fill_(math.inf),
}
NONFINITE_TOKENS = {
    "finite": lambda visual: None,
    "nan-token": lambda visual: visual[:, 0, 0].fill_(math.nan),
    "inf-tokens": lambda visual: (visual[:, 3, 2].fill_(-math.inf), visual[:, 9, 0].fill_(math.inf)),
    "overflow": lambda visual: visual[:, 5].fill_(3e19),  # finite, unscorable: unit row = 0
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masks", [False, True], ids=["no-masks", "masks"])
@pytest.mark.parametrize("tokens_case", list(NONFINITE_TOKENS))
@pytest.mark.parametrize("prompt_case", list(NONFINITE_PROMPT))
def test_nonfinite_prompt_and_tokens_equal_the_reference(prompt_case, tokens_case, masks,
                                                         dtype):
    """Every combination of a non-finite prompt, non-finite tokens and masks: the reference's
    picks exactly (unscorable tokens after scorable ones, NaN distances ignored)."""
    g = torch.Generator().manual_seed(0)
    visual, prompt = torch.randn(2, 16, 64, generator=g), torch.randn(2, 3, 64, generator=g)
    NONFINITE_PROMPT[prompt_case](prompt)
    NONFINITE_TOKENS[tokens_case](visual)
    visual, prompt = visual.to(dtype), prompt.to(dtype)
    prompt_mask = visual_mask = None
    if masks:
        prompt_mask = torch.tensor([[True, False, True], [False, True, True]])
        visual_mask = torch.ones(2, 16, dtype=torch.bool)
        visual_mask[:, 12:] = False
    for keep, ratio in ((4, 1.0), (4, 0.5), (7, 0.0), (12, 0.5), (12, 0.0)):
        kept = select_batched(visual, prompt, keep, ratio, prompt_mask, visual_mask)
        assert torch.equal(kept, reference_select(visual, prompt, keep, ratio, prompt_mask,
                                                  visual_mask)), (keep, ratio)


def test_prompt_edge_cases():
    visual, prompt, _, _ = random_case(12, 2, 23, 16, 5, torch.float32)
    prompt_mask = torch.tensor([[False] * 5, [True] * 5])  # row 0: no prompt
    check(visual, prompt, 9, 0.5, prompt_mask, None)
    check(visual, prompt[:, :0], 9, 0.5, None, None)  # T = 0: pure diversity
    check(visual, torch.zeros_like(prompt), 9, 0.5, None, None)  # zero prompt


def test_keep_beyond_the_real_tokens_takes_padded_ones_last():
    """What runs when value checks are off and a row has fewer real tokens than keep."""
    visual, prompt, _, _ = random_case(19, 2, 30, 8, 4, torch.float32)
    visual_mask = torch.zeros(2, 30, dtype=torch.bool)
    visual_mask[:, ::5] = True  # 6 real tokens, keep 10
    for ratio in (0.0, 0.5):
        kept = select_batched(visual, prompt, 10, ratio, None, visual_mask)
        assert torch.equal(kept, reference_select(visual, prompt, 10, ratio, None, visual_mask))


def test_strided_mixed_dtype_inputs():
    visual, prompt, prompt_mask, visual_mask = random_case(13, 2, 41, 48, 6, torch.float32, prompt_padding=True,
                                                         visual_padding=True)
    visual_t = visual.transpose(1, 2).contiguous().transpose(1, 2)  # feature stride != 1
    prompt_bf16 = prompt.to(torch.bfloat16)[:, ::2]  # another dtype, row stride 2 * D
    check(visual_t, prompt_bf16, 11, 0.5, prompt_mask[:, ::2], visual_mask)


def test_public_api_unbatched_batched_and_the_op():
    """backend="blocked", unbatched inputs, and the op's auto dispatch on CPU all run it."""
    visual, prompt, prompt_mask, visual_mask = random_case(15, 2, 33, 16, 5, torch.float16,
                                                         prompt_padding=True, visual_padding=True)
    expected = select_batched(visual, prompt, 9, 0.5, prompt_mask, visual_mask)
    kept = zspaprune_ops.select(visual, prompt, 9, 0.5, prompt_mask=prompt_mask,
                                visual_mask=visual_mask, backend="blocked")
    assert torch.equal(kept, expected)
    assert torch.equal(torch.ops.zspaprune.select(visual, prompt, 9, 0.5, prompt_mask,
                                                  visual_mask), expected)
    unbatched = zspaprune_ops.select(visual[1], prompt[1], 9, 0.0, backend="blocked")
    assert unbatched.shape == (9,)
    assert torch.equal(unbatched, zspaprune_ops.reference.select(visual[1], prompt[1], 9, 0.0))


def test_extra_memory_is_one_float32_image_copy():
    """B = 4 bfloat16 images of N = 8192, D = 1024 (64 MiB): peak RSS growth stays under one
    float32 copy of one image (32 MiB) plus 12 MiB for O(B·N) buffers and allocator slack. The
    reference makes two float32 copies of the batch (256 MiB each)."""
    script = (
        "import resource, torch\n"
        "from zspaprune_ops.blocked import select_batched\n"
        "select_batched(torch.randn(1, 64, 32), torch.randn(1, 3, 32), 8, 0.5)\n"
        "v = torch.randn(4, 8192, 1024).bfloat16(); p = torch.randn(4, 8, 1024).bfloat16()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "select_batched(v, p, 8, 0.5)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=300)
    assert int(out.stdout.split()[-1]) < (32 + 12) * 2**20
