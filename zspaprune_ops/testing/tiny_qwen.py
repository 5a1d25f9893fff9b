"""Tiny, deterministic Qwen2.5-VL / Qwen3-VL models built offline from configs (random weights).

Used by the tests and the end-to-end benchmark. Nothing is downloaded: the tokenizer is a BPE
trained here on a fixed text with Qwen's special tokens and chat template, the image processor
the PIL-based ``Qwen2VLImageProcessorPil``. transformers' Qwen processors cannot be built
without torchvision (their video processor needs it), so ``encode`` does their job for the
tests (with ``zspaprune_ops.qwen_processor``), and ``video_inputs`` makes video inputs. Weights are re-drawn from N(0, 1/fan_in)
(``common.redraw_weights``).
"""
import os
from typing import Optional

import torch

try:
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.testing.tiny_qwen needs the Hugging Face extra: "
                      "pip install zspaprune[hf]") from error

from zspaprune_ops.qwen_processor import QwenImageProcessor
from zspaprune_ops.testing.common import instantiate, sizes_for, train_bpe

KINDS = ("qwen2_5_vl", "qwen3_vl")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = range(len(SPECIAL_TOKENS))

TINY_SIZES = dict(patch_size=4, vision_hidden=32, vision_layers=2, vision_heads=2,
                  text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2,
                  intermediate=128, vocab_size=320)
"""Default sizes: 4 px patches merged 2x2, so a 32x32 image gives 16 visual tokens."""

QWEN2_5_VL_7B_SIZES = dict(patch_size=14, vision_hidden=1280, vision_layers=32, vision_heads=16,
                           vision_intermediate=3420, text_hidden=3584, text_layers=28,
                           text_heads=28, text_kv_heads=4, intermediate=18944,
                           vocab_size=152064)
"""The shapes of Qwen2.5-VL-7B-Instruct (8.29 B parameters)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen2-VL's chat template (its default system prompt included), images and videos only."""

_CORPUS = ("system You are a helpful assistant. user Describe this image. assistant "
           "What is shown in the picture? Where is the cat? How many objects are there? "
           "The quick brown fox jumps over the lazy dog. Is there a person, a car or a tree? "
           "colors shapes left right top bottom small large near far video seconds 0123456789.")


def build_config(kind: str = "qwen2_5_vl", **sizes):
    """A ``Qwen2_5_VLConfig`` or ``Qwen3VLConfig`` of the given sizes (defaults: ``TINY_SIZES``;
    size keys as there, plus ``vision_intermediate``). Token ids follow ``SPECIAL_TOKENS``."""
    s = sizes_for(kind, KINDS, sizes, TINY_SIZES)
    head_dim = s["text_hidden"] // s["text_heads"]
    spatial = 3 * head_dim // 16  # M-RoPE's head_dim / 2 frequencies over (t, h, w): 2:3:3
    section = [head_dim // 2 - 2 * spatial, spatial, spatial]
    vision = dict(depth=s["vision_layers"], hidden_size=s["vision_hidden"],
                  intermediate_size=s.get("vision_intermediate", 2 * s["vision_hidden"]),
                  num_heads=s["vision_heads"], patch_size=s["patch_size"],
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=s["text_hidden"])
    text = dict(hidden_size=s["text_hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
                num_key_value_heads=s["text_kv_heads"], vocab_size=s["vocab_size"],
                max_position_embeddings=4096, bos_token_id=IM_START, eos_token_id=IM_END,
                pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": section})
    ids = dict(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
               vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    if kind == "qwen2_5_vl":
        # window attention over 2x2 merged windows; the last block attends globally
        vision.update(window_size=4 * s["patch_size"], tokens_per_second=2,
                      fullatt_block_indexes=[s["vision_layers"] - 1])
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    text["head_dim"] = head_dim
    text["rope_parameters"]["mrope_interleaved"] = True
    vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(vision_config=vision, text_config=text, **ids)


def build_model(kind: str = "qwen2_5_vl", seed: int = 0, device=None, dtype=None,
                attn_implementation: Optional[str] = None, **sizes):
    """A Qwen2.5-VL / Qwen3-VL model with random weights on ``device`` / ``dtype`` (default:
    CPU, float32), in eval mode; the same arguments give the same weights.
    ``build_model(**QWEN2_5_VL_7B_SIZES)`` is Qwen2.5-VL-7B-shaped; ``device="meta"`` builds
    shapes only."""
    cls = (Qwen2_5_VLForConditionalGeneration if kind == "qwen2_5_vl"
           else Qwen3VLForConditionalGeneration)
    return instantiate(cls, build_config(kind, **sizes), seed, device, dtype,
                       attn_implementation)


def build_tokenizer(vocab_size: int = TINY_SIZES["vocab_size"]):
    """A byte-level BPE trained on a fixed text, with Qwen's special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(_CORPUS, vocab_size, SPECIAL_TOKENS), pad_token="<|endoftext|>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>",
                              "vision_end_token": "<|vision_end|>"})


def build_image_processor(config):
    """The PIL image processor matching ``config`` (2x2 merge, 4 to 64 merged tokens)."""
    unit = 2 * config.vision_config.patch_size
    return Qwen2VLImageProcessorPil(patch_size=unit // 2, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 4 * unit ** 2,
                                          "longest_edge": 64 * unit ** 2})


def build_tiny_qwen(folder, kind: str = "qwen2_5_vl", seed: int = 0, **sizes) -> str:
    """Build a tiny model; ``save_pretrained`` it, its tokenizer (with ``CHAT_TEMPLATE``) and
    image processor into ``folder``. They load back offline (``AutoModelForImageTextToText``,
    ``AutoTokenizer``, ``Qwen2VLImageProcessorPil``; ``AutoProcessor`` too where torchvision is
    installed: transformers' Qwen processors need it for their video processor). Returns
    ``folder``.
    """
    folder = os.fspath(folder)
    model = build_model(kind, seed=seed, **sizes)
    model.save_pretrained(folder)
    tokenizer = build_tokenizer(model.config.text_config.vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    build_image_processor(model.config).save_pretrained(folder)
    return folder


def encode(tokenizer, image_processor, texts, images=None, videos=(), padding_side="left"):
    """What a Qwen processor returns for a batch, without torchvision: ``QwenImageProcessor``
    for the text and images, plus ``videos``.

    ``videos``: ``video_inputs`` results, whose text must already be in ``texts``. Returns a
    dict of input_ids, attention_mask and, when given, pixel_values / image_grid_thw and
    pixel_values_videos / video_grid_thw / second_per_grid_ts, and mm_token_type_ids (0 text,
    1 image, 2 video: without it the model numbers every token like text).
    """
    processor = QwenImageProcessor(tokenizer, image_processor, SPECIAL_TOKENS[IMAGE_PAD])
    out = dict(processor(images=images or None, text=list(texts), padding=True,
                         padding_side=padding_side))
    for name in videos[0][1] if videos else ():
        out[name] = torch.cat([video[1][name] for video in videos])
    out["mm_token_type_ids"] += 2 * (out["input_ids"] == VIDEO_PAD).long()
    return out


def video_inputs(config, frames: int, height: int, width: int, seconds=None, seed: int = 0):
    """Random pixels for one video and the text that stands for it in the prompt.

    ``frames`` (even), ``height`` and ``width`` in pixels (multiples of 2 * patch size).
    Returns (text, inputs): inputs holds pixel_values_videos [patches, 3 * 2 * p * p],
    video_grid_thw int64 [1, 3] and, for Qwen2.5-VL, second_per_grid_ts [1]. Qwen2.5-VL: one
    ``<|vision_start|>`` span of placeholders; Qwen3-VL: one span per temporal group, each
    after a ``<t seconds>`` timestamp (as its processor writes it).
    """
    p = config.vision_config.patch_size
    grid = (frames // 2, height // p, width // p)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * p * p, generator=generator)
    per_group = grid[1] * grid[2] // 4
    span = "<|vision_start|>" + "<|video_pad|>" * per_group + "<|vision_end|>"
    inputs = {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid])}
    if config.model_type == "qwen3_vl":
        seconds = seconds or [1.0 + 2.0 * t for t in range(grid[0])]
        return "".join(f"<{s:.1f} seconds>{span}" for s in seconds), inputs
    text = "<|vision_start|>" + "<|video_pad|>" * (per_group * grid[0]) + "<|vision_end|>"
    return text, {**inputs, "second_per_grid_ts": torch.tensor([1.0])}


__all__ = ["KINDS", "TINY_SIZES", "QWEN2_5_VL_7B_SIZES", "CHAT_TEMPLATE", "build_config",
           "build_model", "build_tokenizer", "build_image_processor", "build_tiny_qwen",
           "encode", "video_inputs"]
