"""The plugin's selection rule in plain PyTorch (no vLLM needed): budgets, whole images,
LLaVA-NeXT newlines, one op call per batch, and the same picks as one select call per image."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zspaprune_ops
from zspaprune_ops.vllm.selection import PruningConfig, choose_tokens


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
    (8.0, 0.5, TypeError, "keep must be an int"),
])
def test_bad_settings_are_rejected(keep, ratio, error, message):
    with pytest.raises(error, match=message):
        PruningConfig(keep, ratio)


def test_kept_count():
    config = PruningConfig(keep=10)
    assert config.kept_count(7) == 7           # fits: whole
    assert config.kept_count(12, newlines=3) == 9   # fits once its newlines go
    assert config.kept_count(30, newlines=3) == 10  # pruned to keep


def test_mixed_batch_matches_one_select_call_per_image():
    generator = torch.Generator().manual_seed(0)
    D, keep = 16, 6
    newline = torch.randn(D, generator=generator)
    features = [torch.randn(n, D, generator=generator) for n in (4, 9, 20, 13)]
    features[2][[5, 11, 17]] = newline  # a NeXT-style image with three row ends
    features[3][[3]] = newline
    prompts = [torch.randn(t, D, generator=generator) for t in (3, 0, 5, 2)]
    config = PruningConfig(keep, 0.5)
    with CountSelectCalls() as counter:
        kept = choose_tokens(features, prompts, config, newline)
    assert counter.calls == 1  # images 1, 2, 3 pruned together
    assert kept[0].tolist() == [0, 1, 2, 3]  # 4 tokens <= keep: whole
    for image in (1, 2, 3):
        real = (features[image] != newline).any(dim=-1)
        expected = zspaprune_ops.select(features[image], prompts[image], keep, 0.5,
                                        visual_mask=real, backend="reference")
        assert kept[image].tolist() == expected.tolist()
        assert real[kept[image]].all()  # newlines are never picked
    assert [len(k) for k in kept] == [config.kept_count(4), 6, 6, 6]


def test_newlines_dropped_when_the_rest_fits():
    D = 8
    newline = torch.ones(D)
    feature = torch.randn(9, D, generator=torch.Generator().manual_seed(1))
    feature[[2, 5, 8]] = newline
    kept = choose_tokens([feature], [torch.zeros(0, D)], PruningConfig(keep=7), newline)
    assert kept[0].tolist() == [0, 1, 3, 4, 6, 7]
