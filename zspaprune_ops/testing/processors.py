"""transformers processors that also hold a video processor (LLaVA-OneVision, InternVL), for
images and text where torchvision does not import.

transformers builds such a processor only with its video processor class, which needs
torchvision, even for images (``LlavaOnevisionProcessor(..., video_processor=None)`` fails its
class check). ``without_video(cls)`` is ``cls`` with that check waived for a missing video
processor: the same ``__call__`` (placeholder expansion, image processing, tokenization) for
images and text. ``save_processor`` / ``load_processor`` store and restore one as its parts
(tokenizer with the chat template, image processor, ``processor_config.json`` naming the real
class), as ``save_pretrained`` lays them out.
"""
import functools
import json
import os

import torch

try:
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("zspaprune_ops.testing.processors needs the Hugging Face extra: "
                      "pip install zspaprune[hf]") from error

CONFIG_NAME = "processor_config.json"


@functools.lru_cache(maxsize=None)
def without_video(cls) -> type:
    """A subclass of the processor class ``cls`` (same name) that accepts
    ``video_processor=None``, and then takes ``videos`` as processed pixels."""

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


def save_processor(processor, folder) -> None:
    """Save ``processor``'s tokenizer (with the processor's chat template), image processor and
    its own settings into ``folder``."""
    folder = os.fspath(folder)
    processor.tokenizer.chat_template = processor.chat_template
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    settings = {k: v for k, v in processor.to_dict().items()
                if k not in ("image_processor", "video_processor", "tokenizer", "chat_template")}
    settings["processor_class"] = type(processor).__name__
    with open(os.path.join(folder, CONFIG_NAME), "w") as handle:
        json.dump(settings, handle, indent=2, sort_keys=True)


def load_processor(folder):
    """The processor ``save_processor`` saved in ``folder`` (its class from transformers, without a
    video processor)."""
    folder = os.fspath(folder)
    with open(os.path.join(folder, CONFIG_NAME)) as handle:
        settings = json.load(handle)
    cls = without_video(getattr(transformers, settings.pop("processor_class")))
    # a checkpoint's file may also hold its parts' own settings: those load from their files
    parts = set(cls.get_attributes()) | {"chat_template", "auto_map"}
    settings = {k: v for k, v in settings.items() if k not in parts}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return cls(image_processor=AutoImageProcessor.from_pretrained(folder), tokenizer=tokenizer,
               video_processor=None, chat_template=tokenizer.chat_template, **settings)


__all__ = ["without_video", "save_processor", "load_processor"]
