"""What every tiny builder shares: seeded construction and weights, a BPE tokenizer trained here.

A family's builder (``tiny_llava``, ``tiny_qwen``, ...) checks its size options with
``sizes_for``, makes its config, then calls ``instantiate(cls, config, seed)`` for a
deterministic model with distinct visual tokens, and ``train_bpe`` for an offline tokenizer. Nothing here downloads anything.
"""
import math
from typing import Optional

import torch

try:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.testing needs the Hugging Face extra: "
                      "pip install zspaprune[hf]") from error


def redraw_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw in place every weight matrix from N(0, 1/fan_in) and LLaVA-NeXT's image-newline
    vector from N(0, 1/D); other vectors (norms, biases) stay. Hugging Face's default init
    (std 0.02) makes a tiny model's visual tokens nearly identical; these differ. Deterministic for a seed on a
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


def sizes_for(kind: str, kinds, sizes: dict, defaults: dict) -> dict:
    """A builder's size options: ``defaults`` updated by ``sizes``, checked (ValueError for a
    ``kind`` not in ``kinds`` or a size key not in ``defaults``; ``vision_intermediate`` is
    always allowed, default twice the vision width)."""
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    unknown = set(sizes) - set(defaults) - {"vision_intermediate"}
    if unknown:
        raise ValueError(f"unknown size option(s): {sorted(unknown)}")
    return {**defaults, **sizes}


__all__ = ["instantiate", "redraw_weights", "sizes_for", "train_bpe"]
