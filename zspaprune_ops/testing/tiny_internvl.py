"""Tiny, deterministic InternVL models built offline from configs (random weights).

Used by the tests and the end-to-end benchmark. Nothing is downloaded: the vision tower is a
small InternViT, the language model a small Qwen2, the tokenizer a byte-level BPE trained here
with InternVL's special tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``) and the InternVL -hf
checkpoints' chat template, the image processor the PIL-based
``GotOcr2ImageProcessorPil`` (dynamic tiles plus a thumbnail). The processor is transformers'
``InternVLProcessor`` without its video processor (``zspaprune_ops.processors.without_video``:
it needs torchvision). Weights are re-drawn as in ``common.redraw_weights``.
"""
import os
from typing import Optional

try:
    from transformers import (InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVisionConfig, PreTrainedTokenizerFast,
                              Qwen2Config)
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.testing.tiny_internvl needs the Hugging Face extra: "
                      "pip install zspaprune[hf]") from error

from zspaprune_ops.testing.common import instantiate, sizes_for, train_bpe
from zspaprune_ops.processors import without_video
from zspaprune_ops.testing.processors import save_processor

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                  "<IMG_CONTEXT>", "<video>")
PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO = range(len(SPECIAL_TOKENS))

TINY_SIZES = dict(image_size=32, patch_size=4, vision_hidden=32, vision_layers=2, vision_heads=2,
                  text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2,
                  intermediate=128, vocab_size=320, max_tiles=6)
"""Default sizes: 32 px tiles of 8x8 patches, pixel-shuffled to 16 visual tokens per tile; up
to ``max_tiles`` tiles per image, plus a thumbnail."""

INTERNVL3_8B_SIZES = dict(image_size=448, patch_size=14, vision_hidden=1024, vision_layers=24,
                          vision_heads=16, vision_intermediate=4096, text_hidden=3584,
                          text_layers=28, text_heads=28, text_kv_heads=4, intermediate=18944,
                          vocab_size=151674, max_tiles=12)
"""The shapes of InternVL3-8B-hf (InternViT-300M-448px + Qwen2.5-7B): 256 visual tokens per
448 px tile, up to 12 tiles + a thumbnail (3,328 tokens) per image."""

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}{% endif %}")
"""The chat template of transformers' current ``convert_internvl_weights_to_hf.py`` (InternVL3 and
InternVL3.5 "-hf" checkpoints), verbatim. It writes ``<IMG_CONTEXT>`` per image, the placeholder
transformers 5's ``InternVLProcessor`` expands (``tokenizer.context_image_token``); the
converter's first version wrote ``<image>`` (tests/data/chat_templates/internvl3.jinja), which
that processor does not expand."""

_CORPUS = ("system You are a helpful assistant. user What is shown in the image? assistant "
           "A red square on a blue background. Frame1: Frame2: Describe the picture in detail. "
           "Where is the cat? How many objects are there, left and right? The quick brown fox "
           "jumps over the lazy dog. Is there a person, a car or a tree? colors 0123456789")


def build_config(**sizes):
    """An ``InternVLConfig`` of the given sizes (defaults: ``TINY_SIZES``; size keys as there,
    plus ``vision_intermediate``); ``INTERNVL3_8B_SIZES`` gives InternVL3-8B's. Token ids follow
    ``SPECIAL_TOKENS``."""
    s = sizes_for("internvl", ("internvl",), sizes, TINY_SIZES)
    vision = InternVLVisionConfig(
        hidden_size=s["vision_hidden"], num_hidden_layers=s["vision_layers"],
        num_attention_heads=s["vision_heads"],
        intermediate_size=s.get("vision_intermediate", 2 * s["vision_hidden"]),
        image_size=[s["image_size"]] * 2, patch_size=[s["patch_size"]] * 2)
    text = Qwen2Config(
        hidden_size=s["text_hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"], vocab_size=s["vocab_size"],
        max_position_embeddings=32768, pad_token_id=PAD, bos_token_id=IM_START,
        eos_token_id=IM_END)
    per_tile = (s["image_size"] // s["patch_size"]) ** 2 // 4  # pixel shuffle, ratio 0.5
    # untied output embeddings, as InternVL3-8B's Qwen2.5-7B (the 1B's are tied)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMG_CONTEXT,
                          image_seq_length=per_tile, downsample_ratio=0.5,
                          vision_feature_layer=-1, vision_feature_select_strategy="default",
                          tie_word_embeddings=False)


def build_model(seed: int = 0, device=None, dtype=None, attn_implementation: Optional[str] = None,
                **sizes):
    """An InternVL model with random weights on ``device`` / ``dtype`` (default: CPU, float32),
    in eval mode; the same arguments give the same weights.
    ``build_model(**INTERNVL3_8B_SIZES)`` is InternVL3-8B's shape; ``device="meta"`` builds
    shapes only."""
    return instantiate(InternVLForConditionalGeneration, build_config(**sizes), seed, device,
                       dtype, attn_implementation)


def build_tokenizer(vocab_size: int = TINY_SIZES["vocab_size"]):
    """A byte-level BPE trained on a fixed text, with InternVL's special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(_CORPUS, vocab_size, SPECIAL_TOKENS), pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def build_processor(config, max_tiles: int = TINY_SIZES["max_tiles"]):
    """An ``InternVLProcessor`` for ``config`` (PIL image processor with up to ``max_tiles``
    tiles, no video processor: ``zspaprune_ops.processors.without_video``), with
    ``CHAT_TEMPLATE``."""
    side = config.vision_config.image_size[0]
    images = GotOcr2ImageProcessorPil(size={"height": side, "width": side},
                                      crop_to_patches=True, min_patches=1,
                                      max_patches=max_tiles)
    return without_video(InternVLProcessor)(
        image_processor=images, tokenizer=build_tokenizer(config.text_config.vocab_size),
        video_processor=None, image_seq_length=config.image_seq_length,
        chat_template=CHAT_TEMPLATE)


def build_tiny_internvl(folder, seed: int = 0, **sizes) -> str:
    """Build a tiny model and its processor; save both into ``folder``. They load back offline:
    ``AutoModelForImageTextToText.from_pretrained(folder)`` and
    ``zspaprune_ops.processors.load_processor(folder)`` (``AutoProcessor`` where torchvision
    imports). Returns ``folder``."""
    folder = os.fspath(folder)
    model = build_model(seed=seed, **sizes)
    model.save_pretrained(folder)
    tiles = sizes.get("max_tiles", TINY_SIZES["max_tiles"])
    save_processor(build_processor(model.config, tiles), folder)
    return folder


__all__ = ["SPECIAL_TOKENS", "TINY_SIZES", "INTERNVL3_8B_SIZES", "CHAT_TEMPLATE", "build_config",
           "build_model", "build_tokenizer", "build_processor", "build_tiny_internvl"]
