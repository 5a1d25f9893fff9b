"""vLLM with the plugin's Qwen2.5-VL and Qwen3-VL models on tiny random-weight checkpoints:
placeholder counts, exact M-RoPE positions, parity with the HF wrapper
(``positions="original"``).

One engine per kind (keep=5; a 32x40 image has 20 merged tokens). Exact positions are checked
through the prompt's log-probabilities: every pruned prompt token's, against the HF wrapper's
on the same shortened sequence (a token at a wrong position changes them far beyond the
tolerance; the compact-positions wrapper shows by how much).
"""
import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from plugin_helpers import Engine, image  # noqa: E402
from qwen_helpers import QwenReference, checkpoint  # noqa: E402

KEEP = 5
QUESTION = "What is shown in the picture?"
TOLERANCE = 1e-4  # float32 log-probabilities (seen: 1.6e-6; offsets left out: 0.08)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, kind):
    return checkpoint(tmp_path_factory, kind)


@pytest.fixture(scope="module")
def llm(folder, kind):
    started = Engine(folder, kind, KEEP, limit_mm_per_prompt={"image": 3, "video": 0})
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def hf(folder):
    return QwenReference(folder, KEEP)


def prompt_logprobs(output) -> torch.Tensor:
    """float64 [L - 1]: vLLM's log-probability of each prompt token after the first."""
    ids = output.prompt_token_ids
    return torch.tensor([step[token].logprob for step, token in
                         zip(output.prompt_logprobs[1:], ids[1:])], dtype=torch.float64)


def test_one_image_matches_the_hf_wrapper_with_original_positions(llm, hf, folder):
    picture = image(32, 40, 0)
    prompt = hf.prompt(QUESTION)
    out = llm.generate([(prompt, [picture])], prompt_logprobs=0)[0]
    text_ids, kept, tokens, scores = hf.run(prompt, [picture])
    image_token = hf.model.model.config.image_token_id
    assert out.prompt_token_ids.count(image_token) == KEEP == len(kept[0])
    assert len(out.prompt_token_ids) == len(text_ids) + KEEP
    assert llm.selections()[text_ids][-1] == kept[0]
    assert list(out.outputs[0].token_ids) == tokens
    vllm_scores = prompt_logprobs(out)
    assert (vllm_scores - scores).abs().max() < TOLERANCE
    compact = QwenReference(folder, KEEP, positions="compact").run(prompt, [picture])[3]
    assert (compact - scores).abs().max() > 20 * TOLERANCE, "positions should matter here"
