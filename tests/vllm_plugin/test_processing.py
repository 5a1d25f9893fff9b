"""The vLLM plugin's per-item prompts (``zspaprune_ops.vllm.processing``) without vLLM: each
item's prompt ids as the processor computes them from a request's token ids, before and after
vLLM expands the placeholders, across turns, and the ``zspaprune_prompt`` setting."""
import warnings
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from plugin_helpers import chat_messages  # noqa: E402
from zspaprune_ops.prompt import ChatLayout  # noqa: E402
from zspaprune_ops.testing.tiny_llava import CHAT_TEMPLATE, build_tokenizer  # noqa: E402
from zspaprune_ops.vllm.processing import item_prompt_ids, prompt_setting  # noqa: E402

QUESTION = "What is shown in the image?"
FOLLOW_UP = "Where is the cat?"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def layout(tokenizer):
    return ChatLayout(tokenizer, CHAT_TEMPLATE)


def request_ids(tokenizer, *turns, system=None):
    """A request's token ids as vLLM has them before processing: the chat template's text with
    one ``<image>`` per image (``chat_messages``' turns)."""
    text = tokenizer.apply_chat_template(chat_messages(*turns, system=system),
                                         chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def squeeze(text: str) -> str:
    """The visible characters (the rule leaves out tokens that are only blanks)."""
    return "".join(text.split())


def words(tokenizer, ids) -> str:
    return squeeze(tokenizer.decode(list(ids)))


def image_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<image>")


def test_each_image_gets_its_own_question_and_keeps_it_across_turns(tokenizer, layout):
    image = image_id(tokenizer)
    first = request_ids(tokenizer, (QUESTION, 2), system="Be brief.")
    longer = request_ids(tokenizer, (QUESTION, 2), "A red square.", (FOLLOW_UP, 1),
                         system="Be brief.")
    alone = item_prompt_ids(first, {"image": image}, {"image": 2}, layout, "message")
    together = item_prompt_ids(longer, {"image": image}, {"image": 3}, layout, "message")
    assert [words(tokenizer, ids) for ids in together["image"]] == [squeeze(QUESTION)] * 2 + [
        squeeze(FOLLOW_UP)]
    assert together["image"][:2] == alone["image"]


def test_expanded_placeholders_give_the_same_prompts(tokenizer, layout):
    """A request given with its placeholders already expanded (a run per image)."""
    image = image_id(tokenizer)
    ids = request_ids(tokenizer, (QUESTION, 1), "A red square.", (FOLLOW_UP, 1))
    expanded = [t for i in ids for t in ([i] * 8 if i == image else [i])]
    assert (item_prompt_ids(expanded, {"image": image}, {"image": 2}, layout, "message")
            == item_prompt_ids(ids, {"image": image}, {"image": 2}, layout, "message"))


def test_items_that_cannot_be_told_apart_fall_back_to_every_text_token(tokenizer, layout):
    """Two expanded images side by side: which placeholders are whose is unknown, so every
    item's prompt is the whole text (prompt='all'), not some message's."""
    image = image_id(tokenizer)
    ids = request_ids(tokenizer, (QUESTION, 2))
    expanded = [t for i in ids for t in ([i] * 8 if i == image else [i])]
    prompts = item_prompt_ids(expanded, {"image": image}, {"image": 3}, layout, "message")
    every = tuple(i for i in ids if i != image)
    assert prompts == {"image": (every,) * 3}


def test_all_and_no_template(tokenizer, layout):
    image = image_id(tokenizer)
    ids = request_ids(tokenizer, (QUESTION, 1), "A red square.", (FOLLOW_UP, 1))
    every = tuple(i for i in ids if i != image)
    assert item_prompt_ids(ids, {"image": image}, {"image": 2}, layout, "all") == {
        "image": (every, every)}
    with pytest.warns(UserWarning, match="no tokenizer with a chat template"):
        assert item_prompt_ids(ids, {"image": image}, {"image": 2}, None, "message") == {
            "image": (every, every)}


def test_a_request_without_words_has_empty_prompts_and_no_warning(tokenizer, layout):
    """vLLM's profiling requests are placeholders only."""
    image = image_id(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompts = item_prompt_ids([image] * 3, {"image": image, "video": 99},
                                  {"image": 3, "video": 0}, layout, "message")
    assert prompts == {"image": ((), (), ())}


def test_prompt_setting():
    assert prompt_setting(SimpleNamespace()) == "message"
    assert prompt_setting(SimpleNamespace(zspaprune_prompt="all")) == "all"
    with pytest.raises(ValueError, match=r"zspaprune_prompt='question'.*\('message', 'all'\)"):
        prompt_setting(SimpleNamespace(zspaprune_prompt="question"))
