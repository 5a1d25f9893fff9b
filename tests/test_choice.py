"""The choice rule shared by the Hugging Face wrappers and the vLLM plugin (no model needed):
budgets (counts and shares), whole items, LLaVA-NeXT newlines, one selector call per budget,
and the same picks as one select call per item."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zspaprune_ops
from zspaprune_ops.choice import Budget, candidates_without, choose, zspaprune_selector


class CountSelectCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.zspaprune.select.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep, ratio, error, message", [
    (0, 0.5, ValueError, "keep must be >= 1"),
    (8, 1.5, ValueError, "relevance_ratio must be in"),
    (8, -0.1, ValueError, "relevance_ratio must be in"),
    (0.0, 0.5, ValueError, r"must be in \(0, 1\]"),
    (1.5, 0.5, ValueError, r"must be in \(0, 1\]"),
    (float("nan"), 0.5, ValueError, r"must be in \(0, 1\]"),
    (0.5, float("nan"), ValueError, "relevance_ratio must be in"),
    (True, 0.5, TypeError, "keep must be an int"),
    (torch.tensor(3), 0.5, TypeError, "keep must be an int"),
    ("8", 0.5, TypeError, "keep must be an int"),
])
def test_bad_budgets_are_rejected(keep, ratio, error, message):
    with pytest.raises(error, match=message):
        Budget(keep, ratio)


def test_counts_and_shares():
    budget = Budget(keep=10)
    assert budget.kept_count(7) == 7                    # fits: whole
    assert budget.kept_count(12, non_candidates=3) == 9  # fits once its newlines go
    assert budget.kept_count(30, non_candidates=3) == 10  # pruned to keep
    share = Budget(keep=0.25)
    assert [share.count(n) for n in (1, 2, 6, 10, 576)] == [1, 1, 2, 3, 144]  # half up, >= 1
    assert Budget(keep=1.0).kept_count(2880, non_candidates=48) == 2880  # 1.0: whole
    assert Budget(keep=0.5).kept_count(9, non_candidates=3) == 5  # share of all its tokens


def test_mixed_batch_matches_one_select_call_per_image():
    generator = torch.Generator().manual_seed(0)
    D, keep = 16, 6
    newline = torch.randn(D, generator=generator)
    features = [torch.randn(n, D, generator=generator) for n in (4, 9, 20, 13)]
    features[2][[5, 11, 17]] = newline  # a NeXT-style image with three row ends
    features[3][[3]] = newline
    prompts = [torch.randn(t, D, generator=generator) for t in (3, 0, 5, 2)]
    candidates = [candidates_without(f, newline) for f in features]
    with CountSelectCalls() as counter:
        kept = choose(features, candidates, prompts, Budget(keep, 0.5), zspaprune_selector()).kept
    assert counter.calls == 1  # images 1, 2, 3 pruned together
    assert kept[0].tolist() == [0, 1, 2, 3]  # 4 tokens <= keep: whole
    for image in (1, 2, 3):
        real = candidates[image]
        expected = zspaprune_ops.select(features[image], prompts[image], keep, 0.5,
                                        visual_mask=real, backend="reference")
        assert kept[image].tolist() == expected.tolist()
        assert real[kept[image]].all()  # newlines are never picked
    assert [len(k) for k in kept] == [4, 6, 6, 6]


def test_a_share_calls_the_selector_once_per_distinct_budget():
    generator = torch.Generator().manual_seed(2)
    features = [torch.randn(n, 8, generator=generator) for n in (40, 20, 40, 3)]
    prompts = [torch.randn(2, 8, generator=generator) for _ in features]
    budget = Budget(keep=0.25, relevance_ratio=0.5)
    with CountSelectCalls() as counter:
        kept = choose(features, [None] * 4, prompts, budget, zspaprune_selector()).kept
    assert counter.calls == 3  # budgets 10 (items 0 and 2 together), 5 (item 1), 1 (item 3)
    assert [len(k) for k in kept] == [10, 5, 10, 1]
    for item in range(4):
        expected = zspaprune_ops.select(features[item], prompts[item], len(kept[item]), 0.5,
                                        backend="reference")
        assert kept[item].tolist() == expected.tolist()


def test_newlines_dropped_when_the_rest_fits():
    D = 8
    newline = torch.ones(D)
    feature = torch.randn(9, D, generator=torch.Generator().manual_seed(1))
    feature[[2, 5, 8]] = newline
    kept = choose([feature], [candidates_without(feature, newline)], [torch.zeros(0, D)],
                  Budget(keep=7), zspaprune_selector()).kept
    assert kept[0].tolist() == [0, 1, 3, 4, 6, 7]


def test_an_empty_prompt_is_pure_diversity():
    feature = torch.randn(30, 8, generator=torch.Generator().manual_seed(3))
    kept = choose([feature], [None], [torch.zeros(0, 8)], Budget(keep=6, relevance_ratio=1.0),
                  zspaprune_selector()).kept
    divprune = zspaprune_ops.select(feature, torch.zeros(1, 8), 6, 0.0, backend="reference")
    assert kept[0].tolist() == divprune.tolist()
