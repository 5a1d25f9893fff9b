"""What the Qwen models cannot serve with exact positions is refused when the model is built
(``check_engine`` runs first in its ``__init__``), with the reason. (Checked once by hand on a
whole engine: ``video_pruning_rate=0.5`` stops it at start, "Engine core initialization
failed", the worker's log naming the ValueError.)"""
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from zspaprune_ops.vllm.qwen import check_engine  # noqa: E402


def config(pipeline=1, speculative=None, encoder_graphs=False, video_pruning_rate=None):
    from vllm.config import MultiModalConfig
    return SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=pipeline),
        speculative_config=speculative,
        compilation_config=SimpleNamespace(cudagraph_mm_encoder=encoder_graphs),
        model_config=SimpleNamespace(multimodal_config=MultiModalConfig(
            video_pruning_rate=video_pruning_rate)))


def test_a_plain_engine_passes():
    check_engine(config())
    check_engine(config(video_pruning_rate=0.0))


@pytest.mark.parametrize("options, message", [
    (dict(pipeline=2), "pipeline parallelism"),
    (dict(speculative=object()), "speculative decoding"),
    (dict(encoder_graphs=True), "cudagraph_mm_encoder"),
    (dict(video_pruning_rate=0.5), "video_pruning_rate"),
])
def test_unsupported_engine_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        check_engine(config(**options))
