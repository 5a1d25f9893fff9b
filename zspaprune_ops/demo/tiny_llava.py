"""Tiny, deterministic LLaVA / LLaVA-NeXT models built offline from configs (random weights).

Used by the tests, ``zspaprune demo`` and the end-to-end benchmark. Nothing is downloaded:
the vision tower is a small CLIP, the language model a small Llama, the tokenizer a BPE
trained here on a fixed text, the image processor the PIL-based CLIP / LLaVA-NeXT one
(torchvision is not needed).

Hugging Face's default init (std 0.02) makes a tiny model's visual tokens nearly identical,
so every weight matrix is re-drawn from N(0, 1/fan_in) with a seeded generator: the tokens
then differ and the pruning has something to choose between.
"""
import math
import os
from typing import Optional

import torch

try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig,
                              LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.demo.tiny_llava needs the Hugging Face extra: "
                      "pip install zspaprune[hf]") from error

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
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    unknown = set(sizes) - set(TINY_SIZES) - {"vision_intermediate"}
    if unknown:
        raise ValueError(f"unknown size option(s): {sorted(unknown)}")
    s = {**TINY_SIZES, **sizes}
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


def redraw_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw in place every weight matrix from N(0, 1/fan_in) and LLaVA-NeXT's image-newline
    vector from N(0, 1/D); other vectors (norms, biases) stay. Deterministic for a seed on a
    device (drawn on the parameters' device: fast for large models, but CPU and CUDA draws
    differ)."""
    device = next(model.parameters()).device
    if device.type == "meta":
        return model
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2 or name.endswith("image_newline"):
                fan_in = math.prod(param.shape[1:]) if param.dim() >= 2 else param.shape[0]
                param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
    return model


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


def instantiate(cls, config, seed: int, device=None, dtype=None,
                attn_implementation: Optional[str] = None):
    """``cls(config)`` built directly on ``device`` / ``dtype`` from a seeded RNG, weights
    re-drawn (``redraw_weights``), in eval mode."""
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    device = torch.device(device if device is not None else "cpu")
    previous_dtype = torch.get_default_dtype()
    forked = []
    if device.type == "cuda":
        forked = [device.index if device.index is not None else torch.cuda.current_device()]
    # a seeded RNG: Hugging Face's own init also draws a few vectors (e.g. CLIP's class embedding)
    with torch.random.fork_rng(devices=forked), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype or torch.float32)
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(previous_dtype)
    return redraw_weights(model, seed).eval()


def train_bpe(corpus: str, vocab_size: int, special_tokens, unk_token=None):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus``."""
    bpe = Tokenizer(models.BPE(unk_token=unk_token))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([corpus], trainer=trainer)
    return bpe


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


__all__ = ["KINDS", "TINY_SIZES", "LLAVA_15_7B_SIZES", "build_config", "build_model",
           "instantiate", "train_bpe", "build_tokenizer", "build_processor", "build_tiny_llava",
           "redraw_weights"]
