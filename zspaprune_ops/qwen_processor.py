"""Qwen2.5-VL / Qwen3-VL inputs from images and text without torchvision.

transformers' Qwen processors (``AutoProcessor``) cannot be built without torchvision: their
video processor needs it, even for images. ``QwenImageProcessor`` does their job for images and
text with the PIL image processor transformers ships (``Qwen2VLImageProcessorPil``): the same
token ids, attention mask, ``mm_token_type_ids`` and image grids; pixel values differ from the
torchvision processor's only by resize rounding. Videos need the real processor.
"""
from typing import List, Optional, Sequence, Union

IMAGE = 1
"""``mm_token_type_ids`` of an image placeholder (0 for text), as the Qwen processors write."""


class QwenImageProcessor:
    """Callable like ``AutoProcessor.from_pretrained(qwen_checkpoint)`` for images and text.

    ``processor(images=..., text=..., return_tensors="pt")`` expands each image placeholder of
    ``text`` (``<|image_pad|>``, one per image, in order) to the image's merged-token count and
    returns a ``BatchFeature`` of input_ids and attention_mask [B, L] (int64), mm_token_type_ids
    [B, L] (1 = image token), pixel_values [patches, C * temporal * patch * patch] (float32)
    and image_grid_thw [images, 3] (int64). ``apply_chat_template``, ``batch_decode`` and
    ``decode`` are the tokenizer's; ``tokenizer``, ``image_processor`` and ``chat_template``
    are there as on the real processor.
    """

    def __init__(self, tokenizer, image_processor, image_token: str = "<|image_pad|>"):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = getattr(tokenizer, "chat_template", None)

    @classmethod
    def from_pretrained(cls, path) -> "QwenImageProcessor":
        """The tokenizer (with its chat template) and PIL image processor saved in ``path``."""
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil)

        tokenizer = AutoTokenizer.from_pretrained(path)
        image_token_id = AutoConfig.from_pretrained(path).image_token_id
        return cls(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(path),
                   tokenizer.convert_ids_to_tokens(image_token_id))

    def __call__(self, images=None, text: Union[str, Sequence[str], None] = None,
                 return_tensors: Optional[str] = "pt", padding: Union[bool, str] = False,
                 padding_side: Optional[str] = None, videos=None, **kwargs):
        from transformers import BatchFeature

        if videos is not None:
            raise ValueError("videos need transformers' Qwen processor, which needs torchvision")
        if text is None:
            raise ValueError("text is required: the prompt with one image placeholder per image")
        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images is not None:
            pixels = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=pixels["pixel_values"],
                       image_grid_thw=pixels["image_grid_thw"])
            texts = self._expand(texts, out["image_grid_thw"])
        elif any(self.image_token in t for t in texts):
            raise ValueError(f"text holds {self.image_token!r} placeholders but no images were "
                             "given")
        if padding_side is not None:
            kwargs["padding_side"] = padding_side
        tokens = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs)
        out.update(tokens)
        ids = tokens["input_ids"]
        if return_tensors == "pt":
            out["mm_token_type_ids"] = (ids == self.image_token_id).long() * IMAGE
        else:
            out["mm_token_type_ids"] = [[IMAGE * (i == self.image_token_id) for i in row]
                                        for row in ids]
        return BatchFeature(out, tensor_type=return_tensors)

    def _expand(self, texts: List[str], grid_thw) -> List[str]:
        """Each placeholder, in order over the batch, repeated to its image's token count."""
        merge = self.image_processor.merge_size
        counts = (grid_thw.prod(-1) // merge ** 2).tolist()
        found = sum(t.count(self.image_token) for t in texts)
        if found != len(counts):
            raise ValueError(f"text holds {found} {self.image_token!r} placeholder(s) for "
                             f"{len(counts)} image(s)")
        counts = iter(counts)
        expanded = []
        for t in texts:
            head, *rest = t.split(self.image_token)
            expanded.append(head + "".join(self.image_token * next(counts) + part
                                           for part in rest))
        return expanded

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, **kwargs):
        """The chat-formatted text (``tokenize=False``), as the processor returns it."""
        kwargs.setdefault("tokenize", False)
        return self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
