"""zspaprune_ops.prompt on the real chat templates of every supported family (the Jinja text
each checkpoint ships: tests/data/chat_templates, sources in SOURCES.md there), tokenized by a
byte-level BPE (Qwen, InternVL, OneVision), a legacy SentencePiece-style BPE (LLaMA, Mistral,
Yi) or Gemma's SentencePiece style, images expanded as each family's processor expands them."""
import string
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers,  # noqa: E402
                        processors, trainers)
from transformers import PreTrainedTokenizerFast  # noqa: E402

from zspaprune_ops.prompt import ChatLayout, prompt_positions  # noqa: E402

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SYSTEM = "You read scans for a museum archive. Answer briefly."
QUESTIONS = ("What is written on the red sign?", "Compare the two photos: which one is older?",
             "And the cat near the door, what colour is it?")
ANSWER = "It says OPEN in white letters."
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<image>")
CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def expand_llava(text, counts):  # LLaVA, LLaVA-NeXT, OneVision: one <image> per visual token
    pieces = text.split("<image>")
    return pieces[0] + "".join("<image>" * n + rest for n, rest in zip(counts, pieces[1:]))


def expand_qwen(text, counts):
    pieces = text.split("<|image_pad|>")
    return pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))


def expand_internvl(text, counts):
    pieces = text.split("<image>")
    return pieces[0] + "".join("<img>" + "<IMG_CONTEXT>" * n + "</img>" + rest
                               for n, rest in zip(counts, pieces[1:]))


def expand_gemma(text, counts):
    pieces = text.split("<start_of_image>")
    return pieces[0] + "".join("\n\n<start_of_image>" + "<image_soft_token>" * n +
                               "<end_of_image>\n\n" + rest for n, rest in zip(counts, pieces[1:]))


# template -> (tokenizer kind, special tokens, placeholder token, expansion, BOS added by the
# tokenizer rather than the template)
FAMILIES = {
    "llava_1_5": ("sentencepiece", LLAMA_SPECIALS, "<image>", expand_llava, True),
    "llava_next_vicuna": ("sentencepiece", LLAMA_SPECIALS, "<image>", expand_llava, True),
    "llava_next_mistral": ("sentencepiece", LLAMA_SPECIALS, "<image>", expand_llava, True),
    "llava_next_chatml": ("sentencepiece", LLAMA_SPECIALS + CHATML, "<image>", expand_llava,
                          True),
    "qwen2_5_vl": ("bytelevel", CHATML + ("<|vision_start|>", "<|vision_end|>",
                                          "<|image_pad|>", "<|video_pad|>"),
                   "<|image_pad|>", expand_qwen, False),
    "qwen3_vl": ("bytelevel", CHATML + ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                        "<|video_pad|>", "<think>", "</think>"),
                 "<|image_pad|>", expand_qwen, False),
    "llava_onevision": ("bytelevel", CHATML + ("<image>", "<video>"), "<image>", expand_llava,
                        False),
    "internvl3": ("bytelevel", CHATML + ("<img>", "</img>", "<IMG_CONTEXT>"), "<IMG_CONTEXT>",
                  expand_internvl, False),
    "gemma3": ("gemma", ("<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>",
                                 "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                                 "<image_soft_token>"), "<image_soft_token>", expand_gemma, False),
}
CORPUS = " ".join([SYSTEM, *QUESTIONS, ANSWER, "USER ASSISTANT user assistant system model",
                   "[INST] [/INST] <<SYS>> <</SYS>> Picture Video"]) + "\n"


def tokenizer(kind, specials, bos_added):
    """A small trained tokenizer of ``kind`` with ``specials`` as added special tokens."""
    model = models.BPE(unk_token="<unk>" if "<unk>" in specials else None,
                       byte_fallback=kind != "bytelevel")
    bpe = Tokenizer(model)
    if kind == "bytelevel":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # trained with SentencePiece's whitespace split, then run like LLaMA's legacy file
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = list(string.printable) + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator([CORPUS * 20], trainer=trainer)
    if kind == "sentencepiece":  # LLaMA's legacy file: a space prepended to every text piece
        bpe.pre_tokenizer = None
        bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    elif kind == "gemma":  # Gemma's: no dummy prefix
        bpe.pre_tokenizer = None
        bpe.normalizer = normalizers.Replace(" ", "▁")
        bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    bos = "<s>" if "<s>" in specials else "<bos>" if "<bos>" in specials else None
    if bos_added:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))])
    eos = "</s>" if "</s>" in specials else "<eos>" if "<eos>" in specials else "<|im_end|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos,
                                   unk_token="<unk>" if "<unk>" in specials else None)


def conversation(turns=2, images=(1, 2, 0), system=True, answer=True):
    """A chat: a system prompt, then ``turns`` user messages (``images[k]`` images before the
    text of message k, typed parts) with assistant answers between them."""
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}] if system \
        else []
    for k in range(turns):
        if k:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": ANSWER}]})
        messages.append({"role": "user", "content": [{"type": "image"}] * images[k] +
                         [{"type": "text", "text": QUESTIONS[k]}]})
    return messages


def encode(name, messages, counts):
    """(tokenizer, layout, ids, placeholder id, text) of ``messages`` rendered by the template
    ``name`` with each image expanded to ``counts[i]`` tokens."""
    kind, specials, placeholder, expand, bos_added = FAMILIES[name]
    tok = tokenizer(kind, specials, bos_added)
    template = (TEMPLATES / f"{name}.jinja").read_text()
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=True)
    text = expand(text, counts)
    ids = tok(text)["input_ids"]
    return tok, ChatLayout(tok, template), ids, tok.convert_tokens_to_ids(placeholder), text


def image_starts(ids, placeholder):
    return [p for p, i in enumerate(ids) if i == placeholder and (p == 0 or ids[p - 1] != i)]


def expected_positions(tok, text, question, ids):
    """The tokens carrying a character of ``question`` (its last occurrence in ``text``), found
    from the tokenizer's own offsets: the truth the parser must reproduce."""
    start = text.rindex(question)
    end = start + len(question)
    encoded = tok(text, return_offsets_mapping=True)
    assert encoded["input_ids"] == ids
    return [p for p, (a, b) in enumerate(encoded["offset_mapping"])
            if text[max(a, start):min(b, end)].strip()]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_image_gets_exactly_its_user_message(name):
    messages = conversation()
    tok, layout, ids, placeholder, text = encode(name, messages, counts=[5, 3, 7])
    starts = image_starts(ids, placeholder)
    assert len(starts) == 3
    positions = prompt_positions(ids, starts, [placeholder], layout)
    first = expected_positions(tok, text, QUESTIONS[0], ids)
    second = expected_positions(tok, text, QUESTIONS[1], ids)
    assert positions == [first, second, second]  # the two images of message 2 share its text
    for got, question in zip(positions, (QUESTIONS[0], QUESTIONS[1], QUESTIONS[1])):
        assert tok.decode([ids[p] for p in got]).strip() == question


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_appending_turns_changes_no_earlier_prompt(name):
    _, layout, ids, placeholder, _ = encode(name, conversation(turns=1), counts=[4])
    alone = prompt_positions(ids, image_starts(ids, placeholder), [placeholder], layout)
    _, layout, longer, placeholder, _ = encode(name, conversation(turns=3, images=(1, 1, 1)),
                                               counts=[4, 6, 2])
    later = prompt_positions(longer, image_starts(longer, placeholder), [placeholder], layout)
    assert [ids[p] for p in alone[0]] == [longer[p] for p in later[0]]
    assert len({tuple(longer[p] for p in row) for row in later}) == 3  # three questions


@pytest.mark.parametrize("name", ["llava_1_5", "qwen2_5_vl", "gemma3"])
def test_without_a_system_prompt_and_with_the_image_after_the_text(name):
    messages = conversation(turns=1, system=False)
    messages[-1]["content"].reverse()  # the text, then the image
    tok, layout, ids, placeholder, text = encode(name, messages, counts=[3])
    (got,) = prompt_positions(ids, image_starts(ids, placeholder), [placeholder], layout)
    assert got == expected_positions(tok, text, QUESTIONS[0], ids)


def test_all_is_every_real_text_token_but_the_placeholders():
    _, layout, ids, placeholder, _ = encode("qwen2_5_vl", conversation(), counts=[2, 2, 2])
    starts = image_starts(ids, placeholder)
    rows = prompt_positions(ids, starts, [placeholder], layout, prompt="all")
    assert rows == [[p for p, i in enumerate(ids) if i != placeholder]] * 3


def test_fallbacks_say_once_which_rule_they_use():
    _, layout, ids, placeholder, _ = encode("llava_1_5", conversation(), counts=[2, 2, 2])
    everything = [p for p, i in enumerate(ids) if i != placeholder]
    with pytest.warns(UserWarning, match="no tokenizer with a chat template"):
        assert prompt_positions(ids, [5], [placeholder], None) == [everything]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prompt="all" asks for no fallback: no warning
        assert prompt_positions(ids, [5], [placeholder], None, prompt="all") == [everything]
    handwritten = layout.tokenizer("Describe <image> please, briefly.")["input_ids"]
    assert layout.user_messages(handwritten) is None
    with pytest.warns(UserWarning, match="does not match its chat template"):
        rows = prompt_positions(handwritten, [2], [placeholder], layout)
    assert rows == [[p for p, i in enumerate(handwritten) if i != placeholder]]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"prompt must be one of \('message', 'all'\)"):
        prompt_positions([1, 2], [0], [1], None, prompt="question")
    tok = tokenizer("bytelevel", CHATML, False)
    with pytest.raises(ValueError, match="chat_template must be a non-empty"):
        ChatLayout(tok, "  ")
    assert ChatLayout.of(tok) is None and ChatLayout.of(None) is None
