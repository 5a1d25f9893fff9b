"""Saving a tiny builder's processor that has no video processor (LLaVA-OneVision, InternVL).

``save_pretrained`` fails on a processor built by ``zspaprune_ops.processors.without_video``
(it saves every part, and the video processor is missing). ``save_processor`` writes its parts
as a checkpoint lays them out: the tokenizer with the chat template, the image processor, and
``processor_config.json`` naming the real class with its settings. The folder loads back with
``zspaprune_ops.processors.load_processor`` (``AutoProcessor`` where torchvision imports).
"""
import json
import os

from zspaprune_ops.processors import CONFIG_NAME


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


__all__ = ["save_processor"]
