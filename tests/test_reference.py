"""The reference against the float64 literal rule (tests/literal.py) on fresh random inputs."""
import math
import subprocess
import sys

import pytest
import torch

from literal import nearest_other_distance, replay, unit
from zspaprune_ops.reference import select

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_case(seed, B, N, D, T, dtype, *, visual_padding=False, prompt_padding=False,
                duplicates=False, zeros=False):
    """Fresh features (with optional exact duplicates / zero vectors) and masks."""
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, N, D, generator=g)
    if duplicates and N > 2:
        src = torch.randint(0, N, (N // 3,), generator=g)
        dst = torch.randint(0, N, (N // 3,), generator=g)
        visual[:, dst] = visual[:, src]
    if zeros and N > 1:
        visual[:, torch.randint(0, N, (max(1, N // 10),), generator=g)] = 0.0
    prompt = torch.randn(B, T, D, generator=g)
    visual_mask = prompt_mask = None
    if visual_padding:
        visual_mask = torch.rand(B, N, generator=g) < 0.8
        visual_mask[:, 0] = True
    if prompt_padding:
        prompt_mask = torch.rand(B, T, generator=g) < 0.6
        prompt_mask[0] = False  # one row without any real prompt token: pure diversity
    return visual.to(dtype), prompt.to(dtype), prompt_mask, visual_mask


def check_against_literal(visual, prompt, keep, ratio, prompt_mask=None, visual_mask=None):
    if visual_mask is not None:
        keep = min(keep, int(visual_mask.sum(1).min()))
    kept = select(visual, prompt, keep, ratio, prompt_mask=prompt_mask, visual_mask=visual_mask)
    assert kept.dtype == torch.int64 and kept.shape == (visual.shape[0], keep)
    for b in range(visual.shape[0]):
        replay(visual[b], prompt[b], keep, ratio, kept[b],
               None if prompt_mask is None else prompt_mask[b],
               None if visual_mask is None else visual_mask[b])


CASES = [  # seed, B, N, D, T, keep, ratio
    (0, 1, 1, 8, 3, 1, 0.5),
    (1, 2, 2, 5, 4, 1, 0.0),
    (2, 2, 2, 5, 4, 2, 1.0),
    (3, 3, 7, 1, 2, 4, 0.5),      # D = 1: every cosine is +-1, ties everywhere
    (4, 3, 33, 16, 9, 33, 0.3),   # keep = N
    (5, 2, 101, 64, 17, 10, 0.25),  # 10 * 0.25 + 0.5 = 3.0: rounds up exactly at .5
    (6, 1, 577, 96, 40, 64, 0.5),
    (7, 2, 577, 32, 12, 192, 0.9),
    (8, 1, 2880, 32, 25, 288, 0.5),
    (9, 1, 200, 4096, 64, 30, 0.5),
    (10, 2, 50, 8, 1, 5, 0.1),    # 5 * 0.1 + 0.5 = 1.0
    (11, 2, 60, 12, 6, 3, 1 / 6),  # 3/6 + 0.5 = 1.0
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "seed{}-B{}-N{}-D{}-T{}-keep{}-r{:.2f}".format(*c))
def test_matches_literal_rule(case, dtype):
    seed, B, N, D, T, keep, ratio = case
    visual, prompt, _, _ = random_case(seed, B, N, D, T, dtype)
    check_against_literal(visual, prompt, keep, ratio)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(6))
def test_matches_literal_rule_with_masks_ties_and_zeros(seed, dtype):
    g = torch.Generator().manual_seed(100 + seed)
    B, N, D, T = 3, int(torch.randint(3, 300, (1,), generator=g)), 24, 11
    keep = int(torch.randint(1, N // 2 + 1, (1,), generator=g))
    ratio = float(torch.rand(1, generator=g))
    visual, prompt, prompt_mask, visual_mask = random_case(
        seed, B, N, D, T, dtype, visual_padding=True, prompt_padding=True, duplicates=True,
        zeros=True)
    check_against_literal(visual, prompt, keep, ratio, prompt_mask, visual_mask)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_exact_duplicates_resolve_to_the_lower_index(ratio):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 16, generator=g)
    visual = base.repeat(4, 1)  # token i and i + 5k are identical
    prompt = torch.randn(3, 16, generator=g)
    kept = select(visual, prompt, 8, ratio)
    replay(visual, prompt, 8, ratio, kept)
    for i in kept.tolist():  # of identical tokens, the lower-indexed copies go first
        assert i < 5 or i - 5 in kept.tolist()
    if ratio == 0.0:  # the fill never takes a copy while a new token remains
        assert kept.tolist()[:5] == [0, 1, 2, 3, 4]


def test_ratio_zero_is_divprune():
    """DivPrune (CVPR 2025) as its paper states it, in float64: start from the token farthest
    from its nearest neighbour, then add the token farthest from the selected set."""
    visual, prompt, _, _ = random_case(21, 2, 300, 48, 7, torch.float32)
    kept = select(visual, prompt, 40, 0.0)
    for b in range(2):
        v_hat = unit(visual[b].double())
        distance = 1.0 - v_hat @ v_hat.T
        first = int(nearest_other_distance(v_hat, torch.ones(300, dtype=torch.bool)).argmax())
        picks = [first]
        for _ in range(39):
            to_set = distance[:, picks].min(dim=1).values
            to_set[picks] = -math.inf
            picks.append(int(to_set.argmax()))
        assert kept[b].tolist() == sorted(picks)


def test_ratio_one_is_stable_relevance_topk():
    visual, prompt, _, _ = random_case(22, 3, 400, 32, 9, torch.float32, duplicates=True)
    kept = select(visual, prompt, 50, 1.0)
    for b in range(3):
        relevance = unit(visual[b].double()) @ unit(prompt[b].double().mean(0))
        expected = torch.sort(relevance, descending=True, stable=True).indices[:50]
        assert kept[b].tolist() == sorted(expected.tolist())


def test_padded_batch_equals_per_sample_calls():
    g = torch.Generator().manual_seed(5)
    sizes, prompt_sizes, D, keep = [37, 80, 64], [3, 12, 7], 20, 15
    visual = torch.randn(3, 100, D, generator=g)
    prompt = torch.randn(3, 16, D, generator=g)
    visual_mask = torch.zeros(3, 100, dtype=torch.bool)
    prompt_mask = torch.zeros(3, 16, dtype=torch.bool)
    for b, (n, t) in enumerate(zip(sizes, prompt_sizes)):
        visual_mask[b, torch.randperm(100, generator=g)[:n]] = True  # padding anywhere
        prompt_mask[b, torch.randperm(16, generator=g)[:t]] = True
    kept = select(visual, prompt, keep, 0.4, prompt_mask=prompt_mask, visual_mask=visual_mask)
    for b in range(3):
        real = visual_mask[b].nonzero().squeeze(1)
        alone = select(visual[b, real], prompt[b, prompt_mask[b]], keep, 0.4)
        assert kept[b].tolist() == real[alone].tolist()


def test_unbatched_equals_batched():
    visual, prompt, _, _ = random_case(6, 1, 90, 16, 5, torch.bfloat16)
    assert torch.equal(select(visual[0], prompt[0], 9, 0.5), select(visual, prompt, 9, 0.5)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_features_are_taken_last(bad):
    visual, prompt, _, _ = random_case(7, 2, 40, 8, 4, torch.float32)
    broken = [3, 17, 18]
    visual[:, broken, 2] = bad
    kept = select(visual, prompt, 37, 0.5)  # exactly the finite tokens
    for b in range(2):
        assert set(kept[b].tolist()) == set(range(40)) - set(broken)
        replay(visual[b], prompt[b], 37, 0.5, kept[b])
    kept = select(visual, prompt, 40, 0.5)
    assert kept.tolist() == [list(range(40))] * 2


def test_nonfinite_prompt_leaves_a_valid_selection():
    visual, prompt, _, _ = random_case(8, 1, 30, 8, 4, torch.float32)
    prompt[0, 1, 0] = float("nan")
    kept = select(visual, prompt, 10, 0.5)
    replay(visual[0], prompt[0], 10, 0.5, kept[0])  # relevance NaN: core = lowest indices


def test_first_pick_chunks_agree():
    from zspaprune_ops.reference import naive

    visual, prompt, _, _ = random_case(9, 2, 1000, 4, 2, torch.float32)
    old = naive._CHUNK_ELEMENTS
    naive._CHUNK_ELEMENTS = 2 * 1000 * 7  # 7 rows per chunk: many chunks, a ragged last one
    try:
        chunked = select(visual, prompt, 5, 0.0)
    finally:
        naive._CHUNK_ELEMENTS = old
    assert torch.equal(chunked, select(visual, prompt, 5, 0.0))


def test_memory_stays_linear_in_n():
    """N = 20000: an N x N float32 matrix alone would take 1.6 GB; the run must stay far under."""
    script = (
        "import resource, torch\n"
        "from zspaprune_ops.reference import select\n"
        "v = torch.randn(1, 20000, 2); p = torch.randn(1, 3, 2)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "select(v, p, 4, 0.0)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=300)
    assert int(out.stdout.split()[-1]) < 500e6


def test_the_literal_check_rejects_a_wrong_selection():
    """The checker itself can fail: swap one kept token for a rejected one, or for its twin."""
    visual, prompt, _, _ = random_case(10, 1, 60, 16, 4, torch.float32)
    kept = select(visual, prompt, 10, 0.5)[0]
    wrong = kept.clone()
    wrong[3] = next(i for i in range(60) if i not in kept.tolist())
    with pytest.raises(AssertionError):
        replay(visual[0], prompt[0], 10, 0.5, wrong.sort().values)
    twins = torch.cat([visual[0], visual[0]])  # token i + 60 duplicates token i
    kept = select(twins, prompt[0], 10, 0.0)
    with pytest.raises(AssertionError, match="near-tie"):
        replay(twins, prompt[0], 10, 0.0, (kept + 60 * (kept == kept[0])).sort().values)
