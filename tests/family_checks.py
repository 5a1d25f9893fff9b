"""Checks shared by the tests of the LLaVA-OneVision, InternVL and Gemma 3 wrappers: the kept
tokens of the unpruned sequence, the pruned run against the full run with holes, the prompt
each item is scored against."""
import torch

from zspaprune_ops.choice import zspaprune_selector


def real_rows(tensor, mask):
    """The real (mask == 1) positions of each row, as a list of tensors."""
    return [row[m.bool()] for row, m in zip(tensor, mask)]


def kept_flags(placeholders, kept_rows, features):
    """bool [B, L]: the placeholders of ``placeholders`` whose item keeps them, from
    ``PrunedInputs.kept_indices`` rows (-1 = none) and each item's features [N_i, D]."""
    flags = []
    for row, feature in zip(kept_rows, features):
        flag = torch.zeros(feature.shape[0], dtype=torch.bool)
        flag[row[row >= 0]] = True
        flags.append(flag)
    out = torch.zeros_like(placeholders)
    if flags:
        out[placeholders] = torch.cat(flags)
    return out


def assert_pruned_run_equals_full_run_with_holes(wrapped, inputs, holes, positions, steps=4,
                                                 grow=None, tolerance=1e-4):
    """Prefill and ``steps`` greedy steps of ``wrapped`` on left-padded ``inputs`` equal the
    unwrapped model on the whole sequence with attention mask ``holes`` (the dropped tokens
    masked out) and ``positions`` [B, L]; ``grow(extra, token)`` extends family inputs that
    follow the sequence (Gemma 3's token_type_ids)."""
    out = wrapped.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
        logits = wrapped(**inputs).logits
    ids, length = inputs["input_ids"], inputs["input_ids"].shape[1]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    holes = holes.long()
    for step in range(steps):
        with torch.no_grad():
            full = wrapped.model(input_ids=ids, attention_mask=holes, position_ids=positions,
                                 **extra).logits
        if step == 0:
            for got, want in zip(real_rows(logits, pruned.attention_mask), real_rows(full, holes)):
                torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(out.logits[step], full[:, -1], rtol=tolerance, atol=tolerance)
        token = out.sequences[:, length + step][:, None]
        assert torch.equal(token[:, 0], full[:, -1].argmax(-1))
        ids = torch.cat([ids, token], 1)
        holes = torch.cat([holes, torch.ones_like(token)], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        if grow is not None:
            extra = grow(extra, token)
    return pruned


class Recorder:
    """A selector that records each call's prompt rows and runs ZSPAPrune."""

    def __init__(self):
        self.select, self.prompts = zspaprune_selector(), []

    def __call__(self, visual, prompt, keep, ratio, prompt_mask, visual_mask):
        self.prompts += [row[mask] for row, mask in zip(prompt, prompt_mask)]
        return self.select(visual, prompt, keep, ratio, prompt_mask, visual_mask)


def question_tokens(tokenizer, ids, question, occurrence=-1):
    """Positions in ``ids`` of the non-blank tokens carrying ``question`` (its last occurrence by
    default), from the tokenizer's offsets."""
    text = tokenizer.decode(ids)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == ids
    starts, start = [], text.find(question)
    while start >= 0:
        starts.append(start)
        start = text.find(question, start + 1)
    start = starts[occurrence]
    return [p for p, (a, b) in enumerate(encoded["offset_mapping"])
            if text[max(a, start):min(b, start + len(question))].strip()]
