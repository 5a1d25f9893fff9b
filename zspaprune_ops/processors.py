"""A checkpoint's processor where torchvision does not import (PyPI's Linux torchvision is a CUDA
build that fails beside a CPU torch).

transformers' LLaVA-OneVision, InternVL and Qwen processors cannot be built without
torchvision, even for images: each holds a video processor that needs it. ``load_processor``
returns ``AutoProcessor.from_pretrained(path)`` wherever that loads, and otherwise a
processor that does the same for images and text with transformers' PIL image processors:

- LLaVA-OneVision, InternVL: the checkpoint's own processor class without its video processor
  (``without_video``): the same placeholder expansion, image processing and tokenization;
- Qwen2.5-VL / Qwen3-VL: ``zspaprune_ops.qwen_processor.QwenImageProcessor``.

Pixel values then come from the PIL image processor: they differ from the torchvision
processor's only by resize rounding. Hugging Face is imported only when a processor is loaded.
"""
import functools
import json

QWEN_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")
CONFIG_NAME = "processor_config.json"


@functools.lru_cache(maxsize=None)
def without_video(cls) -> type:
    """A subclass of the processor class ``cls`` (same name) that accepts
    ``video_processor=None``. Called like ``cls`` for images and text; its ``videos`` are frames
    already processed as the model takes them (per video a float tensor [frames, 3, S, S]: there
    is no video processor to resize and normalize them), whose placeholders it expands as ``cls``
    does."""
    import torch

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    def _process_videos(self, videos, **kwargs):
        if self.video_processor is not None:
            return cls._process_videos(self, videos, **kwargs)
        processed = {"pixel_values_videos": torch.stack(list(videos))}
        return processed, [self.replace_video_token(processed, video_idx=k, **kwargs)
                           for k in range(len(processed["pixel_values_videos"]))]

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class":
                                       check_argument_for_proper_class,
                                       "_process_videos": _process_videos,
                                       "__module__": __name__})


def needs_torchvision(error: Exception) -> bool:
    """Whether transformers raised ``error`` (an ImportError, or InternVL's ValueError) for want
    of torchvision."""
    return isinstance(error, (ImportError, ValueError)) and "torchvision" in str(error).lower()


def load_processor(path):
    """The processor of the checkpoint at ``path`` (a local folder or a Hub id):
    ``AutoProcessor.from_pretrained(path)``, or where that fails for want of torchvision, its
    images-and-text twin (module docstring). Other failures are raised as they are."""
    from transformers import AutoConfig, AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - re-raised unless it is torchvision's
        if not needs_torchvision(error):
            raise
        missing = error
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in QWEN_MODEL_TYPES:
        from zspaprune_ops.qwen_processor import QwenImageProcessor

        return QwenImageProcessor.from_pretrained(path)
    cls = _processor_class(path, model_type)
    if cls is None or "video_processor" not in cls.get_attributes():
        raise missing
    return _parts_without_video(path, cls)


def _processor_class(path, model_type):
    """The processor class the checkpoint names (``processor_config.json``), else its model
    type's; None if neither is known."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = _settings(path).get("processor_class") or PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if isinstance(name, str) else None


def _settings(path) -> dict:
    """The checkpoint's ``processor_config.json`` ({} without one)."""
    from transformers.utils import cached_file

    file = cached_file(path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
    if file is None:
        return {}
    with open(file, encoding="utf-8") as handle:
        return json.load(handle)


def _parts_without_video(path, cls):
    """``without_video(cls)`` from the checkpoint's tokenizer, image processor (transformers
    picks its PIL class without torchvision), chat template and processor settings."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    # the settings file may also hold its parts' own settings: those load from their files
    parts = set(cls.get_attributes()) | {"chat_template", "auto_map", "processor_class"}
    settings = {k: v for k, v in _settings(path).items() if k not in parts}
    return without_video(cls)(image_processor=AutoImageProcessor.from_pretrained(path),
                              tokenizer=tokenizer, video_processor=None,
                              chat_template=_chat_template(path, tokenizer), **settings)


def _chat_template(path, tokenizer):
    """The tokenizer's chat template (``chat_template.jinja``, transformers 5), else the one in
    an older checkpoint's ``chat_template.json``; None without either."""
    from transformers.utils import cached_file

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    file = cached_file(path, "chat_template.json", _raise_exceptions_for_missing_entries=False)
    if file is None:
        return None
    with open(file, encoding="utf-8") as handle:
        return json.load(handle).get("chat_template")


__all__ = ["QWEN_MODEL_TYPES", "load_processor", "needs_torchvision", "without_video"]
