"""A checkpoint for the commands (``zspaprune demo`` and ``zspaprune eval``): loading it, asking
it a question in its chat format, and the sample picture and question used when none is given.

Its own module so that the demo and the eval share it without importing each other. Hugging
Face is imported only when a checkpoint is loaded.
"""
from pathlib import Path
from typing import Optional

import torch

from zspaprune_ops.errors import UsageError, one_line_error

SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"
"""The bundled sample picture (a red house, a tree, a blue ball in front, the sun): the demo's image with
``--model`` when no ``--image`` is given."""
DEMO_PROMPT = "What is in front of the red house?"
"""The demo's question about ``SAMPLE_IMAGE`` with ``--model`` when no ``--prompt`` is given."""


def load(model_path: Optional[str], device: torch.device, dtype: torch.dtype):
    """(model, processor): ``model_path``'s, or the shipped shapes-world model for None.

    The model is the plain Hugging Face model (any family ``ZSPAPruneModel`` supports), in eval
    mode on ``device`` in ``dtype``; wrap it with ``zspaprune_ops.prune``. The processor is
    ``zspaprune_ops.processors.load_processor``'s: it loads without torchvision.
    """
    from transformers.utils import logging

    from zspaprune_ops.models import ZSPAPruneModel
    from zspaprune_ops.processors import load_processor
    from zspaprune_ops.world.model import SHIPPED_MODEL

    logging.disable_progress_bar()  # the commands print tables; loading bars would garble them
    path = str(SHIPPED_MODEL if model_path is None else model_path)
    wrapped = ZSPAPruneModel.from_pretrained(path, dtype=dtype)
    return wrapped.model.to(device).eval(), load_processor(path)


def load_model(model_path: Optional[str], device: torch.device, dtype: torch.dtype):
    """``load`` for the command line: a ``--model`` folder that fails to load is a UsageError."""
    try:
        return load(model_path, device, dtype)
    except Exception as error:  # noqa: BLE001 (a user's folder: any failure is a usage error)
        if model_path is None:
            raise
        raise UsageError(f"--model {model_path}: not a loadable LLaVA, LLaVA-NeXT, Qwen2.5-VL "
                         f"or Qwen3-VL checkpoint ({one_line_error(error)})") from None


def prompt_text(processor, question: str) -> str:
    """``question`` about one image, chat-formatted for ``processor``'s model (its chat template,
    else LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``), ending where the answer starts."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {image_token}\n{question} ASSISTANT:"
