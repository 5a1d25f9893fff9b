"""The fused kernels at the shapes of the kernels issue, and CUDA-graph capture (CUDA only).

Marked ``gpu`` (``pytest -m gpu tests`` runs these alone) and skipped without a GPU: run them on
a CUDA machine (the kernels then run natively, and the streaming shapes use the cooperative
multi-program launch).
"""
import pytest
import torch

from test_kernels import check, make_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [  # B, N, D, T, keep
    (1, 576, 4096, 32, 64), (4, 576, 4096, 64, 128), (2, 576, 5120, 32, 192),
    (1, 2880, 4096, 128, 288), (8, 2880, 4096, 64, 640), (64, 576, 4096, 512, 64),
    (2, 8192, 4096, 32, 819), (1, 32768, 4096, 32, 3276),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B, N, D, T, keep", SHAPES, ids=[f"B{s[0]}-N{s[1]}-keep{s[4]}" for s in SHAPES])
def test_issue_shapes_match_the_reference(B, N, D, T, keep, dtype):
    masks = dict(visual_padding=True, prompt_padding=True) if B > 1 else {}
    visual, prompt, prompt_mask, visual_mask = make_case(B * N + keep, B, N, D, T, dtype, **masks)
    for ratio in (0.0, 0.5) if N <= 8192 else (0.5,):  # a differing ratio-0 row would need
        # the float64 check's N x N matrix: 8.6 GB at N = 32768
        check(visual, prompt, keep, ratio, prompt_mask, visual_mask, gram=None)


@pytest.mark.parametrize("N", [576, 8192])
def test_cuda_graph_capture_replays_the_op(N):
    visual, prompt, prompt_mask, visual_mask = make_case(N, 2, N, 1024, 16, torch.bfloat16,
                                                         visual_padding=True, prompt_padding=True)
    args = (visual, prompt, 64, 0.5, prompt_mask, visual_mask)
    eager = torch.ops.zspaprune.select(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.zspaprune.select(*args)  # warm-up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.zspaprune.select(*args)
    for _ in range(3):
        captured.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
