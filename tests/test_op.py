"""torch.ops.zspaprune.select as a custom op: schema, fake tensors, torch.compile, the wrapper."""
import pytest
import torch

import zspaprune_ops
from literal import replay
from zspaprune_ops.reference import select as reference_select


def make_inputs(seed, B=2, N=45, T=6, D=16, dtype=torch.float32, masks=True):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(B, N, D, generator=g).to(dtype)
    prompt = torch.randn(B, T, D, generator=g).to(torch.bfloat16)  # dtypes may differ
    prompt_mask = visual_mask = None
    if masks:
        visual_mask = torch.rand(B, N, generator=g) < 0.7
        visual_mask[:, :10] = True
        prompt_mask = torch.rand(B, T, generator=g) < 0.5
        prompt_mask[:, 0] = True
    return visual, prompt, prompt_mask, visual_mask


@pytest.mark.parametrize("masks", [False, True])
def test_opcheck(masks):
    visual, prompt, prompt_mask, visual_mask = make_inputs(0, masks=masks)
    torch.library.opcheck(torch.ops.zspaprune.select.default,
                          (visual, prompt, 7, 0.5, prompt_mask, visual_mask))


def test_op_equals_reference():
    visual, prompt, prompt_mask, visual_mask = make_inputs(1)
    out = torch.ops.zspaprune.select(visual, prompt, 9, 0.3, prompt_mask, visual_mask)
    expected = reference_select(visual, prompt, 9, 0.3, prompt_mask=prompt_mask,
                                visual_mask=visual_mask)
    assert out.dtype == torch.int64 and out.device == visual.device
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_equals_eager(backend, dynamic):
    def prune(visual, prompt, prompt_mask, visual_mask):
        kept = zspaprune_ops.select(visual, prompt, 8, 0.5, prompt_mask=prompt_mask,
                                    visual_mask=visual_mask)
        rows = torch.arange(visual.shape[0])[:, None]
        return visual[rows, kept] * 2.0  # graph work around the op

    torch._dynamo.reset()
    compiled = torch.compile(prune, backend=backend, fullgraph=True, dynamic=dynamic)
    for seed, N in [(2, 45), (3, 61)]:  # a second N exercises dynamic shapes / recompiles
        args = make_inputs(seed, N=N)
        assert torch.equal(compiled(*args), prune(*args))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_with_keep_and_ratio_as_arguments(backend):
    """Changing scalars make dynamo trace them symbolically (automatic dynamic)."""
    torch._dynamo.reset()
    prune = torch.compile(lambda v, p, k, r: zspaprune_ops.select(v, p, k, r), fullgraph=True,
                          backend=backend)
    visual, prompt, _, _ = make_inputs(7, masks=False)
    for keep, ratio in [(5, 0.5), (6, 0.3), (9, 0.0), (4, 1.0)]:
        assert torch.equal(prune(visual, prompt, keep, ratio),
                           zspaprune_ops.select(visual, prompt, keep, ratio))
    with pytest.raises(Exception, match=r"keep must be in \[1, N=45\]"):
        prune(visual, prompt, 46, 0.5)


def test_compile_unbatched_wrapper():
    visual, prompt, _, _ = make_inputs(4, masks=False)
    fn = torch.compile(lambda v, p: zspaprune_ops.select(v, p, 5, 0.0), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(visual[0], prompt[0]), zspaprune_ops.select(visual[0], prompt[0], 5, 0.0))


def test_compile_reports_bad_input():
    visual, prompt, _, _ = make_inputs(5, masks=False)
    fn = torch.compile(lambda v, p: torch.ops.zspaprune.select(v, p, 100, 0.5), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(Exception, match=r"keep must be in \[1, N=45\]"):
        fn(visual, prompt)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_wrapper_backends_agree_with_the_reference(dtype, backend):
    """Each backend equals the reference, up to float64-verified near-ties (the kernels sum in
    another order); on CPU ``auto`` is the reference and ``triton`` runs interpreted."""
    visual, prompt, prompt_mask, visual_mask = make_inputs(6, dtype=dtype)
    kept = zspaprune_ops.select(visual, prompt, 12, 0.5, prompt_mask=prompt_mask,
                                visual_mask=visual_mask, backend=backend)
    expected = reference_select(visual, prompt, 12, 0.5, prompt_mask=prompt_mask,
                                visual_mask=visual_mask)
    for b in torch.nonzero((kept != expected).any(dim=1)).flatten().tolist():
        replay(visual[b], prompt[b], 12, 0.5, kept[b], prompt_mask[b], visual_mask[b])
