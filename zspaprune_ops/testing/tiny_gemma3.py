"""Tiny, deterministic Gemma 3 models built offline from configs (random weights).

Used by the tests and the end-to-end benchmark. Nothing is downloaded: the vision tower is a
small SigLIP whose patches are average-pooled to ``mm_tokens_per_image`` tokens, the language
model a small Gemma 3 text model with sliding-window and global layers, the tokenizer a
byte-level BPE trained here with Gemma's special tokens and gemma-3-it's verbatim chat
template, the processor transformers' ``Gemma3Processor`` with the PIL image processor
(pan-and-scan included). Weights are re-drawn as in ``common.redraw_weights``.
"""
import os
from typing import Optional

try:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig, PreTrainedTokenizerFast, SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.testing.tiny_gemma3 needs the Hugging Face extra: "
                      "pip install zspaprune[hf]") from error

from zspaprune_ops.testing.common import instantiate, sizes_for, train_bpe

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>")
PAD, EOS, BOS, UNK, TURN_START, TURN_END, BOI, EOI, IMAGE = range(len(SPECIAL_TOKENS))

TINY_SIZES = dict(image_size=32, patch_size=4, vision_hidden=32, vision_layers=2, vision_heads=2,
                  text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2, head_dim=16,
                  intermediate=128, vocab_size=320, tokens_per_image=16, sliding_window=512,
                  sliding_pattern=2)
"""Default sizes: 32 px images of 8x8 patches pooled to 16 tokens; the language model's layers
alternate sliding-window (``sliding_window`` tokens) and global attention, one global layer
every ``sliding_pattern`` layers."""

GEMMA3_4B_SIZES = dict(image_size=896, patch_size=14, vision_hidden=1152, vision_layers=27,
                       vision_heads=16, vision_intermediate=4304, text_hidden=2560,
                       text_layers=34, text_heads=8, text_kv_heads=4, head_dim=256,
                       intermediate=10240, vocab_size=262208, tokens_per_image=256,
                       sliding_window=1024, sliding_pattern=6)
"""The shapes of google/gemma-3-4b-it (SigLIP-so400m/14-896 pooled to 256 tokens per image, a
34-layer text model, five 1024-token sliding-window layers per global one)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content"
    "'] is string -%}\n        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n "
    "   {%- else -%}\n        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n"
    "\n' -%}\n    {%- endif -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    "
    "{%- set first_user_prefix = \"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%"
    "}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') != (loop.ind"
    "ex0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must alternate user/assis"
    "tant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant'"
    ") -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = messag"
    "e['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefi"
    "x if loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ messa"
    "ge['content'] | trim }}\n    {%- elif message['content'] is iterable -%}\n        {%- for it"
    "em in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n              "
    "  {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n               "
    " {{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else "
    "-%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<en"
    "d_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>mo"
    "del\n'}}\n{%- endif -%}\n")
"""The chat template of google/gemma-3-4b-it, verbatim (tests/data/chat_templates/gemma3.jinja)."""

_CORPUS = ("user You are a helpful assistant. model What is shown in the image? A red square on a "
           "blue background. Here is the original image and here are some crops to help you see "
           "better. Where is the cat? How many objects are there, left and right? The quick "
           "brown fox jumps over the lazy dog. Is there a person, a car or a tree? 0123456789")


def build_config(**sizes):
    """A ``Gemma3Config`` of the given sizes (defaults: ``TINY_SIZES``; size keys as there, plus
    ``vision_intermediate``); ``GEMMA3_4B_SIZES`` gives gemma-3-4b's. Token ids follow
    ``SPECIAL_TOKENS``."""
    s = sizes_for("gemma3", ("gemma3",), sizes, TINY_SIZES)
    vision = SiglipVisionConfig(
        image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["vision_hidden"],
        intermediate_size=s.get("vision_intermediate", 2 * s["vision_hidden"]),
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
        vision_use_head=False)
    pattern = s["sliding_pattern"]
    layer_types = ["full_attention" if (k + 1) % pattern == 0 else "sliding_attention"
                   for k in range(s["text_layers"])]
    text = Gemma3TextConfig(
        hidden_size=s["text_hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"], head_dim=s["head_dim"],
        query_pre_attn_scalar=s["head_dim"], vocab_size=s["vocab_size"],
        sliding_window=s["sliding_window"], layer_types=layer_types,
        max_position_embeddings=32768, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return Gemma3Config(text_config=text, vision_config=vision,
                        mm_tokens_per_image=s["tokens_per_image"], boi_token_index=BOI,
                        eoi_token_index=EOI, image_token_index=IMAGE)


def build_model(seed: int = 0, device=None, dtype=None, attn_implementation: Optional[str] = None,
                **sizes):
    """A Gemma 3 model with random weights on ``device`` / ``dtype`` (default: CPU, float32), in
    eval mode; the same arguments give the same weights. ``build_model(**GEMMA3_4B_SIZES)`` is
    gemma-3-4b's shape; ``device="meta"`` builds shapes only."""
    return instantiate(Gemma3ForConditionalGeneration, build_config(**sizes), seed, device, dtype,
                       attn_implementation)


def build_tokenizer(vocab_size: int = TINY_SIZES["vocab_size"]):
    """A byte-level BPE trained on a fixed text, with Gemma's special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(_CORPUS, vocab_size, SPECIAL_TOKENS, unk_token="<unk>"),
        pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})


def build_processor(config):
    """A ``Gemma3Processor`` for ``config`` (PIL image processor), with ``CHAT_TEMPLATE``.
    Pan-and-scan: call it with ``do_pan_and_scan=True, pan_and_scan_min_crop_size=16`` (the
    processor's default minimum crop, 256 px, is for 896 px images)."""
    side = config.vision_config.image_size
    images = Gemma3ImageProcessorPil(size={"height": side, "width": side})
    return Gemma3Processor(image_processor=images,
                           tokenizer=build_tokenizer(config.text_config.vocab_size),
                           chat_template=CHAT_TEMPLATE, image_seq_length=config.mm_tokens_per_image)


def build_tiny_gemma3(folder, seed: int = 0, **sizes) -> str:
    """Build a tiny model and its processor; ``save_pretrained`` both into ``folder`` (they load
    back offline with ``AutoModelForImageTextToText`` / ``AutoProcessor``). Returns ``folder``."""
    folder = os.fspath(folder)
    model = build_model(seed=seed, **sizes)
    model.save_pretrained(folder)
    build_processor(model.config).save_pretrained(folder)
    return folder


__all__ = ["SPECIAL_TOKENS", "TINY_SIZES", "GEMMA3_4B_SIZES", "CHAT_TEMPLATE", "build_config",
           "build_model", "build_tokenizer", "build_processor", "build_tiny_gemma3"]
