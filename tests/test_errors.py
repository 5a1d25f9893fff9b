"""Bad input raises a clear error naming the argument, from the wrapper, the reference and the op."""
import numpy as np
import pytest
import torch

import zspaprune_ops
from zspaprune_ops.reference import select as reference_select

B, N, T, D = 2, 10, 4, 8


def op_select(visual, prompt, keep, relevance_ratio=0.5, *, prompt_mask=None, visual_mask=None):
    return torch.ops.zspaprune.select(visual, prompt, keep, relevance_ratio, prompt_mask,
                                      visual_mask)


CALLERS = {"wrapper": zspaprune_ops.select, "reference": reference_select, "op": op_select}


def inputs(**changes):
    args = dict(visual=torch.randn(B, N, D), prompt=torch.randn(B, T, D), keep=3,
                relevance_ratio=0.5, prompt_mask=None, visual_mask=None)
    args.update(changes)
    return args


def call(caller, args):
    args = dict(args)
    return CALLERS[caller](args.pop("visual"), args.pop("prompt"), args.pop("keep"),
                           args.pop("relevance_ratio"), **args)


BAD = [  # id, changed inputs, error, message
    ("visual-rank-1", dict(visual=torch.randn(N)), ValueError, "visual must be"),
    ("visual-rank-4", dict(visual=torch.randn(1, B, N, D)), ValueError, "visual must be"),
    ("prompt-rank", dict(prompt=torch.randn(T, D)), ValueError, "prompt must have rank"),
    ("batch-mismatch", dict(prompt=torch.randn(B + 1, T, D)), ValueError, "prompt has batch size"),
    ("dim-mismatch", dict(prompt=torch.randn(B, T, D + 1)), ValueError, "prompt has feature size"),
    ("visual-int", dict(visual=torch.ones(B, N, D, dtype=torch.int32)), TypeError, "visual must be float16"),
    ("visual-bool", dict(visual=torch.ones(B, N, D, dtype=torch.bool)), TypeError, "visual must be float16"),
    ("visual-complex", dict(visual=torch.randn(B, N, D, dtype=torch.complex64)), TypeError, "visual must be float16"),
    ("visual-float64", dict(visual=torch.randn(B, N, D, dtype=torch.float64)), TypeError, "visual must be float16"),
    ("prompt-int", dict(prompt=torch.ones(B, T, D, dtype=torch.int64)), TypeError, "prompt must be float16"),
    ("keep-0", dict(keep=0), ValueError, r"keep must be in \[1, N=10\]"),
    ("keep-negative", dict(keep=-2), ValueError, r"keep must be in \[1, N=10\]"),
    ("keep-above-n", dict(keep=N + 1), ValueError, r"keep must be in \[1, N=10\]"),
    ("keep-above-real", dict(visual_mask=torch.arange(N).expand(B, N) < 2), ValueError,
     "keep=3 exceeds the real tokens"),
    ("ratio-negative", dict(relevance_ratio=-0.1), ValueError, r"relevance_ratio must be in \[0, 1\]"),
    ("ratio-above-one", dict(relevance_ratio=1.5), ValueError, r"relevance_ratio must be in \[0, 1\]"),
    ("ratio-nan", dict(relevance_ratio=float("nan")), ValueError, r"relevance_ratio must be in \[0, 1\]"),
    ("visual-mask-shape", dict(visual_mask=torch.ones(B, N + 1, dtype=torch.bool)), ValueError,
     r"visual_mask must have shape \[2, 10\]"),
    ("prompt-mask-shape", dict(prompt_mask=torch.ones(B, dtype=torch.bool)), ValueError,
     r"prompt_mask must have shape \[2, 4\]"),
    ("visual-mask-dtype", dict(visual_mask=torch.ones(B, N, dtype=torch.uint8)), TypeError,
     "visual_mask must be a bool tensor"),
    ("prompt-mask-dtype", dict(prompt_mask=torch.ones(B, T)), TypeError, "prompt_mask must be a bool tensor"),
    ("prompt-device", dict(prompt=torch.randn(B, T, D, device="meta")), ValueError, "prompt is on meta"),
    ("mask-device", dict(visual_mask=torch.ones(B, N, dtype=torch.bool, device="meta")), ValueError,
     "visual_mask is on meta"),
    ("n-zero", dict(visual=torch.randn(B, 0, D)), ValueError, "at least one token"),
    ("d-zero", dict(visual=torch.randn(B, N, 0), prompt=torch.randn(B, T, 0)), ValueError,
     "at least one token and one feature"),
]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("changes,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises(caller, changes, error, message):
    with pytest.raises(error, match=message):
        call(caller, inputs(**changes))


PYTHON_TYPES = [  # the op's schema types these itself (the dispatcher's error names the argument)
    ("keep-float", dict(keep=2.5), "keep must be an int"),
    ("keep-bool", dict(keep=True), "keep must be an int"),
    ("keep-numpy-bool", dict(keep=np.bool_(True)), "keep must be an int"),
    ("keep-tensor", dict(keep=torch.tensor(3)), "keep must be an int"),
    ("ratio-str", dict(relevance_ratio="0.5"), "relevance_ratio must be a float"),
    ("visual-list", dict(visual=[[0.0]]), "visual must be a torch.Tensor"),
    ("mask-list", dict(visual_mask=[True] * N), "visual_mask must be a torch.Tensor or None"),
]


@pytest.mark.parametrize("caller", ["wrapper", "reference"])
@pytest.mark.parametrize("changes,message", [b[1:] for b in PYTHON_TYPES], ids=[b[0] for b in PYTHON_TYPES])
def test_bad_python_types_raise_type_error(caller, changes, message):
    with pytest.raises(TypeError, match=message):
        call(caller, inputs(**changes))


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("keep", [np.int64(3), np.int32(3), np.array(3)], ids=repr)
def test_integer_like_keep_is_accepted(caller, keep):
    args = inputs(keep=keep)
    kept = call(caller, args)
    assert kept.shape == (B, 3) and torch.equal(kept, call(caller, {**args, "keep": 3}))


@pytest.mark.parametrize("backend", ["reference", "blocked", "triton"])
def test_integer_like_keep_reaches_each_backend_as_an_int(backend):
    visual, prompt = torch.randn(N, D), torch.randn(T, D)
    kept = zspaprune_ops.select(visual, prompt, np.int64(4), backend=backend)
    assert torch.equal(kept, zspaprune_ops.select(visual, prompt, 4, backend="reference"))


def test_unbatched_masks_must_be_1d():
    with pytest.raises(ValueError, match="visual_mask must be 1-D"):
        zspaprune_ops.select(torch.randn(N, D), torch.randn(T, D), 3,
                             visual_mask=torch.ones(1, N, dtype=torch.bool))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        zspaprune_ops.select(torch.randn(N, D), torch.randn(T, D), 3, backend="cuda")


def test_value_checks_can_be_turned_off():
    """Without the value check (no device sync), a row short of real tokens still gets
    distinct in-range indices: all its real tokens, then padded ones, lowest index first."""
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    args = inputs(keep=6, visual_mask=mask)
    previous = zspaprune_ops.set_value_checks(False)
    try:
        kept = call("wrapper", args)
    finally:
        zspaprune_ops.set_value_checks(previous)
    assert kept[1].tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="exceeds the real tokens"):
        call("wrapper", args)
