"""Bad pruning settings stop the engine at start, with a message naming the setting."""
import pytest

pytest.importorskip("vllm")

from plugin_helpers import Engine, checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checkpoint(tmp_path_factory, "llava")


@pytest.mark.parametrize("keep, ratio, prompt, message", [
    (0, 0.5, "message", r"zspaprune_keep=0.*keep must be >= 1"),
    (8, 1.5, "message", r"zspaprune_relevance_ratio=1.5.*relevance_ratio must be in \[0, 1\]"),
    (8, -0.5, "message", r"relevance_ratio must be in \[0, 1\]"),
    (8, 0.5, "question", r"zspaprune_prompt='question'.*one of \('message', 'all'\)"),
])
def test_bad_setting_is_rejected_at_engine_start(folder, keep, ratio, prompt, message):
    with pytest.raises(ValueError, match=message):
        Engine(folder, "llava", keep, ratio, prompt=prompt)
