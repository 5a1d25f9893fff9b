"""vLLM with the plugin's LLaVA-1.5 model on a tiny random-weight checkpoint: placeholder count,
parity with the HF wrapper, the prompt-aware encoder cache, several images per prompt, a
multi-turn chat whose second request hits the prefix cache through the first turn's image.

One engine for the module (keep=8 of 16 tokens per image); prefix caching and chunked prefill
are on (vLLM's defaults), with 32-token KV blocks (the CPU default, 128, is longer than these
prompts, so nothing would be cached) and stat logging on (for vLLM's prefix-cache counters).
"""
import pytest

pytest.importorskip("vllm")

from plugin_helpers import Engine, HFReference, chat_messages, checkpoint, image  # noqa: E402

BLOCK = 32

KEEP = 8
PROMPT = "USER: <image> What is shown in the image? ASSISTANT:"
OTHER_PROMPT = "USER: <image> Where is the cat? ASSISTANT:"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return checkpoint(tmp_path_factory, "llava")


@pytest.fixture(scope="module")
def llm(folder):
    started = Engine(folder, "llava", KEEP, limit_mm_per_prompt={"image": 3}, block_size=BLOCK,
                     disable_log_stats=False)
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def hf(folder):
    return HFReference(folder, KEEP)


def test_each_image_takes_keep_placeholders(llm, hf):
    image_token = hf.model.model.config.image_token_id
    expected = hf.run(PROMPT, [image(32, 32, 0)])
    out = llm.generate([(PROMPT, [image(32, 32, 0)])])[0]
    assert out.prompt_token_ids.count(image_token) == KEEP
    assert len(out.prompt_token_ids) == len(expected.text_ids) + KEEP


def test_same_image_two_prompts_in_one_batch(llm, hf):
    """The encoder cache trap: one image, two questions, one batch: each request gets its own
    selection, the one the HF wrapper makes, and the HF wrapper's tokens."""
    picture = image(48, 40, 1)
    tokens = llm.tokens([(PROMPT, [picture]), (OTHER_PROMPT, [picture])])
    recorded = llm.selections()
    expected = [hf.run(prompt, [picture]) for prompt in (PROMPT, OTHER_PROMPT)]
    assert expected[0].kept != expected[1].kept, "test image should give prompt-dependent picks"
    for reference, vllm_tokens in zip(expected, tokens):
        assert recorded[reference.prompt_ids[0]][-1] == reference.kept[0]
        assert vllm_tokens == reference.tokens


def test_same_prompt_again_hits_the_caches(llm, hf):
    """Repeating a request (encoder cache and prefix cache hits) gives the same tokens."""
    picture = image(40, 40, 2)
    first = llm.tokens([(PROMPT, [picture])])
    again = llm.tokens([(PROMPT, [picture]), (PROMPT, [picture])])
    assert again == first * 2 == [hf.run(PROMPT, [picture]).tokens] * 2


def test_several_images_per_prompt(llm, hf):
    prompt = "USER: <image> and <image> and <image>: how many objects are there? ASSISTANT:"
    pictures = [image(32, 32, 10), image(64, 48, 11), image(36, 52, 12)]
    tokens = llm.tokens([(prompt, pictures)])
    expected = hf.run(prompt, pictures)
    assert len(set(expected.prompt_ids)) == 1  # one message: one prompt for its three images
    assert llm.selections()[expected.prompt_ids[0]][-3:] == expected.kept
    assert tokens[0] == expected.tokens


def chat(hf, *turns) -> str:
    """The chat template's prompt for ``chat_messages(*turns)``."""
    return hf.processor.apply_chat_template(chat_messages(*turns), add_generation_prompt=True)


def prefix_cache_hits(llm) -> int:
    """vLLM's own counter of prompt tokens served from the prefix cache."""
    return sum(metric.value for metric in llm.llm.get_metrics()
               if metric.name == "vllm:prefix_cache_hits")


def test_second_turn_keeps_the_first_images_selection_and_cache(llm, hf):
    """Turn 2 of a chat (turn 1, its answer, turn 2 with a new image) after turn 1: the turn-1
    image's prompt is its own question only, so its hash, its selection and the prefix cache
    through it survive the appended turns; the new image's prompt is turn 2's question. Both
    selections and the tokens equal the HF wrapper's."""
    first, second = image(40, 36, 20), image(36, 40, 21)
    question = ("What is shown in the image? Describe the colors and shapes of the objects "
                "on the left and on the right, top and bottom.")
    follow_up = "Where is the cat in this one?"
    turn_1 = chat(hf, (question, 1))
    turn_2 = chat(hf, (question, 1), "A red square on a blue background.", (follow_up, 1))
    alone, together = hf.run(turn_1, [first]), hf.run(turn_2, [first, second])
    def words(text):  # the rule leaves out tokens with no visible character (lone spaces)
        return "".join(text.split())

    decode = hf.processor.tokenizer.decode
    assert [words(decode(ids)) for ids in together.prompt_ids] == [words(question),
                                                                  words(follow_up)]
    assert together.prompt_ids[0] == alone.prompt_ids[0]
    assert together.kept[0] == alone.kept[0]  # the HF wrapper: turn-stable too

    out_1 = llm.generate([(turn_1, [first])])[0]
    assert llm.selections()[alone.prompt_ids[0]][-1] == alone.kept[0]
    assert list(out_1.outputs[0].token_ids) == alone.tokens
    assert len(out_1.prompt_token_ids) >= BLOCK  # the image lies in a full block

    hits = prefix_cache_hits(llm)
    out_2 = llm.generate([(turn_2, [first, second])])[0]
    cached = out_2.num_cached_tokens
    image_token = hf.model.model.config.image_token_id
    assert cached == len(out_1.prompt_token_ids) // BLOCK * BLOCK
    assert out_2.prompt_token_ids[:cached] == out_1.prompt_token_ids[:cached]
    assert out_2.prompt_token_ids[:cached].count(image_token) == KEEP  # all of turn 1's image
    assert prefix_cache_hits(llm) - hits == cached
    assert llm.selections()[together.prompt_ids[1]][-1] == together.kept[1]
    assert list(out_2.outputs[0].token_ids) == together.tokens

    # The same conversation with the turn-1 image under another identity (a request UUID):
    # nothing cached, so vLLM selects its tokens again, inside the longer chat: the same ones.
    from vllm import SamplingParams
    llm.llm.generate([{"prompt": turn_2, "multi_modal_data": {"image": [first, second]},
                       "multi_modal_uuids": {"image": ["turn-1 image again", None]}}],
                     SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.selections()[alone.prompt_ids[0]][-1] == alone.kept[0]
