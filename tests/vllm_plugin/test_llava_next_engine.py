"""vLLM with the plugin's LLaVA-NeXT model on a tiny random-weight checkpoint: variable token
counts per image, newline handling, images smaller than ``keep``, parity with the HF wrapper.

One engine for the module, keep=50. A 32x32 tile gives 16 tokens; AnyRes grids add up to 64
more plus one newline per grid row, so images here have 34 to 88 tokens. The engine schedules at
most 32 tokens per step, so prompts are prefilled in chunks that split the image placeholders.
"""
import pytest

pytest.importorskip("vllm")

from plugin_helpers import Engine, HFReference, checkpoint, image  # noqa: E402

KEEP = 50
PROMPT = "USER: <image> Describe the picture in detail. ASSISTANT:"
# (width, height) -> tokens kept (a 64x32 image has 52 tokens, 4 of them newlines)
KEPT = {
    (64, 8): 34,   # 34 tokens, smaller than keep: kept whole with its 2 newlines
    (64, 32): 48,  # 52 tokens: too many, but 48 without the newlines, which fit in keep
    (64, 64): 50,  # 88 tokens: pruned to keep
    (40, 56): 50,  # 72 tokens (a 2x2 grid unpadded to 8x6): pruned to keep
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checkpoint(tmp_path_factory, "llava_next")


@pytest.fixture(scope="module")
def llm(folder):
    started = Engine(folder, "llava_next", KEEP, max_num_batched_tokens=32,
                     limit_mm_per_prompt={"image": 2})
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def hf(folder):
    return HFReference(folder, KEEP)


@pytest.mark.parametrize("size", list(KEPT), ids=[f"{w}x{h}" for w, h in KEPT])
def test_matches_the_hf_wrapper(llm, hf, size):
    picture = image(*size, seed=sum(size))
    out = llm.generate([(PROMPT, [picture])])[0]
    expected = hf.run(PROMPT, [picture])
    image_token = hf.model.model.config.image_token_id
    assert out.prompt_token_ids.count(image_token) == len(expected.kept[0]) == KEPT[size]
    assert llm.selections()[expected.prompt_ids[0]][-1] == expected.kept[0]
    assert list(out.outputs[0].token_ids) == expected.tokens


def test_small_image_is_kept_whole(llm, hf):
    """An image with fewer tokens than keep keeps all of them, newlines included."""
    picture = image(64, 8, seed=5)
    expected = hf.run(PROMPT, [picture])
    llm.tokens([(PROMPT, [picture])])
    assert llm.selections()[expected.prompt_ids[0]][-1] == expected.kept[0] == list(range(34))


def test_batch_of_prompts_and_image_sizes(llm, hf):
    """Two requests, three images of different sizes, one with two images: one batch."""
    two = "USER: <image> <image> Which is larger? ASSISTANT:"
    requests = [(two, [image(64, 64, 7), image(64, 24, 8)]), (PROMPT, [image(64, 64, 7)])]
    tokens = llm.tokens(requests)
    recorded = llm.selections()
    for (prompt, pictures), vllm_tokens in zip(requests, tokens):
        expected = hf.run(prompt, pictures)
        assert recorded[expected.prompt_ids[0]][-len(pictures):] == expected.kept
        assert vllm_tokens == expected.tokens
