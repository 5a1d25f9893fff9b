"""vLLM with the plugin's Qwen2.5-VL and Qwen3-VL models on tiny random-weight checkpoints:
placeholder counts, exact M-RoPE positions, parity with the HF wrapper
(``positions="original"``): one image, several images of different sizes in one prompt, a
batch of requests, chunked prefill, the encoder and prefix caches.

One engine per kind: Qwen2.5-VL keeps 5 tokens per image, Qwen3-VL a share (0.3) of each
image's (a 32x40 image has 20 merged tokens). The engines schedule at most 16 tokens per step,
so every prompt is prefilled in chunks, most of which split an image's placeholders. Exact
positions are checked through the prompt's log-probabilities: every pruned prompt token's,
against the HF wrapper's on the same shortened sequence (with the kept tokens' offsets left
out they differ by 0.08; the compact-positions wrapper differs by 0.4).
"""
import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from plugin_helpers import Engine, image  # noqa: E402
from qwen_helpers import QwenReference, checkpoint  # noqa: E402

KEEP = {"qwen2_5_vl": 5, "qwen3_vl": 0.3}
QUESTION = "What is shown in the picture?"
OTHER_QUESTION = "Where is the cat?"
TOLERANCE = 1e-4  # float32 log-probabilities (seen: 1.6e-6; offsets left out: 0.08)


@pytest.fixture(scope="module", params=list(KEEP))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, kind):
    return checkpoint(tmp_path_factory, kind)


@pytest.fixture(scope="module")
def llm(folder, kind):
    # block_size 32: the CPU default (128) is longer than these prompts: no prefix-cache hits
    started = Engine(folder, kind, KEEP[kind], max_num_batched_tokens=16, block_size=32,
                     limit_mm_per_prompt={"image": 3, "video": 0})
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def hf(folder, kind):
    return QwenReference(folder, KEEP[kind])


def prompt_logprobs(output) -> torch.Tensor:
    """float64 [L - 1]: vLLM's log-probability of each prompt token after the first."""
    ids = output.prompt_token_ids
    return torch.tensor([step[token].logprob for step, token in
                         zip(output.prompt_logprobs[1:], ids[1:])], dtype=torch.float64)


def check(llm, hf, requests, outputs):
    """Each vLLM output has the HF wrapper's placeholder count, kept indices, greedy tokens
    and prompt log-probabilities."""
    recorded = llm.selections()
    image_token = hf.model.model.config.image_token_id
    for (prompt, pictures), out in zip(requests, outputs):
        text_ids, kept, tokens, scores, prompts = hf.run(prompt, pictures)
        assert out.prompt_token_ids.count(image_token) == sum(map(len, kept))
        assert len(out.prompt_token_ids) == len(text_ids) + sum(map(len, kept))
        for key in set(prompts):  # images of one message share its prompt (the record key)
            mine = [k for p, k in zip(prompts, kept) if p == key]
            found = recorded[key]
            assert any(found[i:i + len(mine)] == mine for i in range(len(found))), (mine, found)
        assert list(out.outputs[0].token_ids) == tokens
        if out.prompt_logprobs is not None:
            assert (prompt_logprobs(out) - scores).abs().max() < TOLERANCE


def test_one_image_matches_the_hf_wrapper_with_original_positions(llm, hf, folder, kind):
    requests = [(hf.prompt(QUESTION), [image(32, 40, 0)])]
    out = llm.generate(requests, prompt_logprobs=0)
    check(llm, hf, requests, out)
    assert out[0].prompt_token_ids.count(hf.model.model.config.image_token_id) == \
        hf.model.budget.kept_count(20)
    compact = QwenReference(folder, KEEP[kind], positions="compact").run(*requests[0])[3]
    assert (compact - hf.run(*requests[0])[3]).abs().max() > 20 * TOLERANCE, \
        "positions should matter here"


def test_several_images_a_batch_and_the_encoder_cache(llm, hf):
    """One batch: three images of different sizes in one prompt, the same image under two
    questions, and a repeated request (its image comes from the encoder cache)."""
    three = hf.prompt(QUESTION, images=3)
    pictures = [image(32, 40, 1), image(48, 32, 2), image(40, 56, 3)]
    single = [image(24, 32, 4)]
    requests = [(three, pictures), (hf.prompt(QUESTION), single),
                (hf.prompt(OTHER_QUESTION), single), (hf.prompt(QUESTION), single)]
    check(llm, hf, requests, llm.generate(requests, prompt_logprobs=0))


def test_repeated_prompt_hits_the_prefix_cache(llm, hf):
    """Without prompt log-probabilities the repeat reads its prompt from the prefix cache; its
    new tokens still follow from the original positions."""
    requests = [(hf.prompt(OTHER_QUESTION, images=2), [image(40, 40, 5), image(32, 48, 6)])]
    first = llm.generate(requests)
    again = llm.generate(requests)
    assert again[0].num_cached_tokens > 0
    check(llm, hf, requests, first)
    check(llm, hf, requests, again)
