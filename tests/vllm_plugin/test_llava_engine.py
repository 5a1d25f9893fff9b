"""vLLM with the plugin's LLaVA-1.5 model on a tiny random-weight checkpoint: placeholder count,
parity with the HF wrapper, the prompt-aware encoder cache, several images per prompt.

One engine for the module (keep=8 of 16 tokens per image); prefix caching and chunked prefill
are on (vLLM's defaults).
"""
import pytest

pytest.importorskip("vllm")

from plugin_helpers import Engine, HFReference, checkpoint, image  # noqa: E402

KEEP = 8
PROMPT = "USER: <image> What is shown in the image? ASSISTANT:"
OTHER_PROMPT = "USER: <image> Where is the cat? ASSISTANT:"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checkpoint(tmp_path_factory, "llava")


@pytest.fixture(scope="module")
def llm(folder):
    started = Engine(folder, "llava", KEEP, limit_mm_per_prompt={"image": 3})
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def hf(folder):
    return HFReference(folder, KEEP)


def test_each_image_takes_keep_placeholders(llm, hf):
    image_token = hf.model.model.config.image_token_id
    text_ids, _, _ = hf.run(PROMPT, [image(32, 32, 0)])
    out = llm.generate([(PROMPT, [image(32, 32, 0)])])[0]
    assert out.prompt_token_ids.count(image_token) == KEEP
    assert len(out.prompt_token_ids) == len(text_ids) + KEEP


def test_same_image_two_prompts_in_one_batch(llm, hf):
    """The encoder cache trap: one image, two questions, one batch: each request gets its own
    selection, the one the HF wrapper makes, and the HF wrapper's tokens."""
    picture = image(48, 40, 1)
    tokens = llm.tokens([(PROMPT, [picture]), (OTHER_PROMPT, [picture])])
    recorded = llm.selections()
    expected = [hf.run(prompt, [picture]) for prompt in (PROMPT, OTHER_PROMPT)]
    assert expected[0][1] != expected[1][1], "test image should give prompt-dependent picks"
    for (text_ids, kept, hf_tokens), vllm_tokens in zip(expected, tokens):
        assert recorded[text_ids][-1] == kept[0]
        assert vllm_tokens == hf_tokens


def test_same_prompt_again_hits_the_caches(llm, hf):
    """Repeating a request (encoder cache and prefix cache hits) gives the same tokens."""
    picture = image(40, 40, 2)
    first = llm.tokens([(PROMPT, [picture])])
    again = llm.tokens([(PROMPT, [picture]), (PROMPT, [picture])])
    assert again == first * 2 == [hf.run(PROMPT, [picture])[2]] * 2


def test_several_images_per_prompt(llm, hf):
    prompt = "USER: <image> and <image> and <image>: how many objects are there? ASSISTANT:"
    pictures = [image(32, 32, 10), image(64, 48, 11), image(36, 52, 12)]
    tokens = llm.tokens([(prompt, pictures)])
    text_ids, kept, hf_tokens = hf.run(prompt, pictures)
    assert llm.selections()[text_ids][-3:] == kept
    assert tokens[0] == hf_tokens
