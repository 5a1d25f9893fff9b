"""The Qwen side of the vLLM plugin tests: tiny Qwen2.5-VL / Qwen3-VL checkpoints, chat prompts
and what the HF wrapper (``positions="original"``) keeps, generates and scores."""
import torch

from zspaprune_ops.models.sequence import kept_placeholders
from plugin_helpers import MAX_NEW_TOKENS, SIZES


def checkpoint(tmp_path_factory, kind: str) -> str:
    from zspaprune_ops.testing.tiny_qwen import build_tiny_qwen
    return build_tiny_qwen(tmp_path_factory.mktemp(kind), kind, seed=3, **SIZES)


class QwenReference:
    """What ``ZSPAPruneModel`` keeps, generates and scores for a tiny Qwen checkpoint."""

    def __init__(self, folder: str, keep, relevance_ratio: float = 0.5,
                 positions: str = "original"):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil)
        from zspaprune_ops import ZSPAPruneModel
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
        self.model = ZSPAPruneModel.from_pretrained(folder, keep=keep,
                                                    relevance_ratio=relevance_ratio,
                                                    positions=positions,
                                                    attn_implementation="eager")

    def prompt(self, question: str, images: int = 1) -> str:
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def inputs(self, prompt: str, images):
        from zspaprune_ops.testing.tiny_qwen import encode
        return encode(self.tokenizer, self.image_processor, [prompt], images)

    def text_ids(self, prompt: str, images) -> tuple:
        """The prompt's token ids but the image placeholders (the plugin's record key)."""
        ids = self.inputs(prompt, images)["input_ids"][0]
        return tuple(ids[ids != self.model.model.config.image_token_id].tolist())

    def image_prompts(self, inputs) -> list:
        """Each image's relevance prompt ids (the plugin's record key), by the shared rule."""
        from zspaprune_ops.prompt import prompt_positions
        image_token = self.model.model.config.image_token_id
        ids = inputs["input_ids"][0].tolist()
        starts = [p for p, i in enumerate(ids) if i == image_token
                  and (p == 0 or ids[p - 1] != image_token)]
        positions = prompt_positions(ids, starts, [image_token], self.model.layout,
                                     self.model.prompt)
        return [tuple(ids[p] for p in row) for row in positions]

    @torch.no_grad()
    def run(self, prompt: str, images):
        """(prompt text ids, kept positions per image, greedy new tokens, log-probabilities
        float64 [L' - 1] of each pruned prompt token after the first, each image's prompt
        ids)."""
        inputs = self.inputs(prompt, images)
        pruned = self.model.prune_inputs(**inputs)
        kept = [[i for i in row if i >= 0] for row in pruned.kept_indices.tolist()]
        with self.model.language_inputs(pruned):
            logits = self.model.model(inputs_embeds=pruned.inputs_embeds,
                                      attention_mask=pruned.attention_mask,
                                      position_ids=pruned.position_ids).logits[0].double()
        ids = inputs["input_ids"]
        placeholders = ids == self.model.model.config.image_token_id
        ids = ids[~placeholders | kept_placeholders(placeholders, pruned.image_features,
                                                    [torch.tensor(k) for k in kept])]
        scores = logits[:-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]
        length = inputs["input_ids"].shape[1]
        tokens = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return (self.text_ids(prompt, images), kept, tokens[0, length:].tolist(), scores,
                self.image_prompts(inputs))
