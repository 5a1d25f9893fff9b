"""Tiny, deterministic LLaVA / LLaVA-NeXT models built offline from configs (random weights).

Used by the tests, the README's snippets and the benchmarks. Nothing is downloaded: the
vision tower is a small CLIP, the language model a small Llama, the tokenizer a BPE trained
here on a fixed text, the image processor the PIL-based CLIP / LLaVA-NeXT one (torchvision is
not needed). Weights are re-drawn from N(0, 1/fan_in) (``common.redraw_weights``) so that the
visual tokens differ and the pruning has something to choose between.
"""
import os
from typing import Optional

try:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig,
                              LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.testing.tiny_llava needs the Hugging Face extra: "
                      "pip install zspaprune[hf]") from error

from zspaprune_ops.testing.common import instantiate, sizes_for, train_bpe

KINDS = ("llava", "llava_next")
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)

TINY_SIZES = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                  text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=2,
                  intermediate=128, vocab_size=320)
"""Default sizes of the tiny model (16 visual tokens per 32x32 image tile)."""

LLAVA_15_7B_SIZES = dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24,
                         vision_heads=16, vision_intermediate=4096, text_hidden=4096,
                         text_layers=32, text_heads=32, text_kv_heads=32, intermediate=11008,
                         vocab_size=32064)
"""The shapes of LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B): 576 visual tokens per image."""

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] if content['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
"""LLaVA-1.5's prompt format (``USER: <image>\n... ASSISTANT:``), as llava-hf's chat template."""

_CORPUS = ("USER: What is shown in the image? ASSISTANT: A red square on a blue background. "
           "Describe the picture in detail. Where is the cat? How many objects are there? "
           "The quick brown fox jumps over the lazy dog. Is there a person, a car or a tree? "
           "colors shapes left right top bottom small large near far bright dark 0123456789")


def build_config(kind: str = "llava", **sizes):
    """A ``LlavaConfig`` or ``LlavaNextConfig`` of the given sizes (defaults: ``TINY_SIZES``).

    Size keys: image_size, patch_size, vision_hidden, vision_layers, vision_heads,
    vision_intermediate, text_hidden, text_layers, text_heads, text_kv_heads, intermediate,
    vocab_size; ``LLAVA_15_7B_SIZES`` gives LLaVA-1.5-7B's shapes. The image token id is
    ``SPECIAL_TOKENS.index("<image>")``.
    """
    s = sizes_for(kind, KINDS, sizes, TINY_SIZES)
    vision = CLIPVisionConfig(
        image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["vision_hidden"],
        intermediate_size=s.get("vision_intermediate", 2 * s["vision_hidden"]),
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
        projection_dim=s["vision_hidden"])
    text = LlamaConfig(
        hidden_size=s["text_hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"], vocab_size=s["vocab_size"],
        max_position_embeddings=4096, pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<s>"), eos_token_id=SPECIAL_TOKENS.index("</s>"))
    common = dict(vision_config=vision, text_config=text,
                  image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if kind == "llava":
        tokens_per_image = (s["image_size"] // s["patch_size"]) ** 2
        return LlavaConfig(image_seq_length=tokens_per_image, **common)
    tile = s["image_size"]
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)




def build_model(kind: str = "llava", seed: int = 0, device=None, dtype=None,
                attn_implementation: Optional[str] = None, **sizes):
    """A LLaVA / LLaVA-NeXT model with random weights, built directly on ``device`` / ``dtype``
    (default: CPU, float32), in eval mode.

    Sizes as in ``build_config``; ``build_model(**LLAVA_15_7B_SIZES)`` is LLaVA-1.5-7B-shaped
    (7.06 B parameters: about 14 GB in bfloat16). ``device="meta"`` builds shapes only.
    The same arguments give the same weights.
    """
    config = build_config(kind, **sizes)
    cls = LlavaForConditionalGeneration if kind == "llava" else LlavaNextForConditionalGeneration
    return instantiate(cls, config, seed, device, dtype, attn_implementation)






def build_tokenizer(vocab_size: int = TINY_SIZES["vocab_size"]):
    """A byte-level BPE trained on a fixed text, with ``<image>`` as a special token."""
    bpe = train_bpe(_CORPUS, vocab_size, SPECIAL_TOKENS, unk_token="<unk>")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def build_processor(kind: str, config):
    """The processor matching ``config``: CLIP (LLaVA) or AnyRes (LLaVA-NeXT) image processing."""
    tokenizer = build_tokenizer(config.text_config.vocab_size)
    vision = config.vision_config
    size = {"shortest_edge": vision.image_size}
    crop = {"height": vision.image_size, "width": vision.image_size}
    common = dict(tokenizer=tokenizer, patch_size=vision.patch_size, chat_template=CHAT_TEMPLATE,
                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                  num_additional_image_tokens=1)
    if kind == "llava":
        images = CLIPImageProcessorPil(size=size, crop_size=crop)
        return LlavaProcessor(image_processor=images, **common)
    images = LlavaNextImageProcessorPil(size=size, crop_size=crop,
                                        image_grid_pinpoints=config.image_grid_pinpoints)
    return LlavaNextProcessor(image_processor=images, **common)


def build_tiny_llava(folder, kind: str = "llava", seed: int = 0, **sizes) -> str:
    """Build a tiny model, tokenizer and processor; ``save_pretrained`` them into ``folder``.

    Everything loads back offline with ``from_pretrained(folder)`` (model class of ``kind``,
    ``AutoProcessor``). Deterministic: same arguments, same weights. Returns ``folder``.
    """
    folder = os.fspath(folder)
    model = build_model(kind, seed=seed, **sizes)
    model.save_pretrained(folder)
    build_processor(kind, model.config).save_pretrained(folder)
    return folder


__all__ = ["KINDS", "TINY_SIZES", "LLAVA_15_7B_SIZES", "CHAT_TEMPLATE", "build_config",
           "build_model", "build_tokenizer", "build_processor", "build_tiny_llava"]
