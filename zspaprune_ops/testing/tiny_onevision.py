"""Tiny, deterministic LLaVA-OneVision models built offline from configs (random weights).

Used by the tests and the end-to-end benchmark. Nothing is downloaded: the vision tower is a
small SigLIP, the language model a small Qwen2, the tokenizer a byte-level BPE trained here
with OneVision's special tokens and its checkpoints' verbatim chat template, the image
processor the PIL-based ``LlavaOnevisionImageProcessorPil`` (any-resolution tiles, no
torchvision). transformers' OneVision video processor needs torchvision, so ``video_inputs``
makes a video's pixels and placeholder text for the tests. Weights are re-drawn as in
``common.redraw_weights`` (the image-newline vector included).
"""
import math
import os
from typing import Optional

import torch

try:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionProcessor, PreTrainedTokenizerFast, Qwen2Config,
                              SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.testing.tiny_onevision needs the Hugging Face extra: "
                      "pip install zspaprune[hf]") from error

from zspaprune_ops.testing.common import instantiate, sizes_for, train_bpe
from zspaprune_ops.processors import without_video
from zspaprune_ops.testing.processors import save_processor

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
PAD, IM_START, IM_END, IMAGE, VIDEO = range(len(SPECIAL_TOKENS))

TINY_SIZES = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                  text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2,
                  intermediate=128, vocab_size=320, max_tiles=3)
"""Default sizes: 32 px tiles of 4x4 patches (16 visual tokens per tile); any-resolution grids
of up to ``max_tiles`` x ``max_tiles`` tiles."""

ONEVISION_7B_SIZES = dict(image_size=384, patch_size=14, vision_hidden=1152, vision_layers=26,
                          vision_heads=16, vision_intermediate=4304, text_hidden=3584,
                          text_layers=28, text_heads=28, text_kv_heads=4, intermediate=18944,
                          vocab_size=152128, max_tiles=6)
"""The shapes of llava-onevision-qwen2-7b-ov-hf (SigLIP-so400m/14-384 without its last layer +
Qwen2-7B; 729 visual tokens per tile, grids up to 6x6 tiles, ``anyres_max_9``)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all "
    "images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all video then #}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for "
    "content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] }}"
    "{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""The chat template of llava-hf/llava-onevision-qwen2-*-ov-hf, verbatim (transformers'
``convert_llava_onevision_weights_to_hf.py``; tests/data/chat_templates/llava_onevision.jinja)."""

_CORPUS = ("system You are a helpful assistant. user What is shown in the image? assistant "
           "A red square on a blue background. Describe the video in detail. Where is the cat? "
           "How many objects are there, left and right? The quick brown fox jumps over the "
           "lazy dog. Is there a person, a car or a tree? colors shapes top bottom 0123456789")


def build_config(**sizes):
    """A ``LlavaOnevisionConfig`` of the given sizes (defaults: ``TINY_SIZES``; size keys as
    there, plus ``vision_intermediate``); ``ONEVISION_7B_SIZES`` gives the 7B checkpoint's.
    Token ids follow ``SPECIAL_TOKENS``. Any-resolution pinpoints: every grid of 1..max_tiles
    tiles a side."""
    s = sizes_for("llava_onevision", ("llava_onevision",), sizes, TINY_SIZES)
    vision = SiglipVisionConfig(
        image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["vision_hidden"],
        intermediate_size=s.get("vision_intermediate", 2 * s["vision_hidden"]),
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
        vision_use_head=False)
    text = Qwen2Config(
        hidden_size=s["text_hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"], vocab_size=s["vocab_size"],
        max_position_embeddings=32768, pad_token_id=PAD, bos_token_id=IM_START,
        eos_token_id=IM_END)
    tile, n = s["image_size"], s["max_tiles"]
    pinpoints = [[tile * h, tile * w] for h in range(1, n + 1) for w in range(1, n + 1)]
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE, video_token_index=VIDEO,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=pinpoints)


def build_model(seed: int = 0, device=None, dtype=None, attn_implementation: Optional[str] = None,
                **sizes):
    """A LLaVA-OneVision model with random weights on ``device`` / ``dtype`` (default: CPU,
    float32), in eval mode; the same arguments give the same weights.
    ``build_model(**ONEVISION_7B_SIZES)`` is the 7B checkpoint's shape; ``device="meta"`` builds
    shapes only."""
    return instantiate(LlavaOnevisionForConditionalGeneration, build_config(**sizes), seed,
                       device, dtype, attn_implementation)


def build_tokenizer(vocab_size: int = TINY_SIZES["vocab_size"]):
    """A byte-level BPE trained on a fixed text, with OneVision's special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(_CORPUS, vocab_size, SPECIAL_TOKENS), pad_token="<|endoftext|>",
        eos_token="<|im_end|>", extra_special_tokens={"image_token": "<image>",
                                                      "video_token": "<video>"})


def build_processor(config):
    """A ``LlavaOnevisionProcessor`` for ``config`` (PIL image processor, no video processor:
    ``zspaprune_ops.processors.without_video``), with ``CHAT_TEMPLATE``."""
    vision = config.vision_config
    images = LlavaOnevisionImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        image_grid_pinpoints=config.image_grid_pinpoints)
    return without_video(LlavaOnevisionProcessor)(
        image_processor=images, tokenizer=build_tokenizer(config.text_config.vocab_size),
        video_processor=None,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio, chat_template=CHAT_TEMPLATE)


def build_tiny_onevision(folder, seed: int = 0, **sizes) -> str:
    """Build a tiny model and its processor; save both into ``folder``. They load back offline:
    ``AutoModelForImageTextToText.from_pretrained(folder)`` and
    ``zspaprune_ops.processors.load_processor(folder)`` (``AutoProcessor`` where torchvision
    imports). Returns ``folder``."""
    folder = os.fspath(folder)
    model = build_model(seed=seed, **sizes)
    model.save_pretrained(folder)
    save_processor(build_processor(model.config), folder)
    return folder


def video_inputs(config, frames: int, seed: int = 0):
    """Random pixels for one video and its placeholder text, as OneVision's processor makes them.

    Returns (text, pixel_values_videos float32 [1, frames, 3, S, S]): the text is ``<video>``
    repeated frames * ceil(side / 2)^2 + 1 times (each frame's patch grid pooled 2x2, then one
    image-newline token for the whole video); it replaces the template's ``<video>``.
    """
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    pooled = math.ceil(side / 2) ** 2
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, frames, 3, vision.image_size, vision.image_size, generator=generator)
    return "<video>" * (frames * pooled + 1), pixels


__all__ = ["SPECIAL_TOKENS", "TINY_SIZES", "ONEVISION_7B_SIZES", "CHAT_TEMPLATE", "build_config",
           "build_model", "build_tokenizer", "build_processor", "build_tiny_onevision",
           "video_inputs"]
