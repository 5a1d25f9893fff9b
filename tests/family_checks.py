"""Checks shared by the tests of the model wrappers (LLaVA-OneVision, InternVL and Gemma 3 use
all of them; LLaVA and Qwen the prompt ones): the kept tokens of the unpruned sequence, the
pruned run against the full run with holes, the prompt each item is scored against."""
import torch

import zspaprune_ops
from zspaprune_ops.choice import zspaprune_selector
from zspaprune_ops.models.sequence import position_ids_from_mask


_models = {}


def wrap(folder, default_processor, keep=5, ratio=0.5, attn="sdpa", **kwargs):
    """``zspaprune_ops.prune`` of the checkpoint in ``folder`` (loaded once per folder and
    attention implementation), given ``default_processor`` for its chat template unless
    ``kwargs`` name a ``processor``."""
    key = (str(folder), attn)
    if key not in _models:
        _models[key] = zspaprune_ops.ZSPAPruneModel.from_pretrained(
            folder, attn_implementation=attn).model
    kwargs.setdefault("processor", default_processor)
    return zspaprune_ops.prune(_models[key], keep, ratio, **kwargs)


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


def assert_batch_equals_samples(wrapped, inputs, samples, padding_side):
    """A padded batch equals its samples run alone: the same kept tokens, logits and greedy
    tokens; the shortened batch keeps the input's padding side. ``samples``: per sample, (its
    inputs without padding, the slice of ``kept_indices`` rows that are its images)."""
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
        logits = wrapped(**inputs).logits
    new = wrapped.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = new[:, inputs["input_ids"].shape[1]:]
    for sample, (alone, images) in enumerate(samples):
        with torch.no_grad():
            pruned_alone = wrapped.prune_inputs(**alone)
            logits_alone = wrapped(**alone).logits
        assert torch.equal(pruned.kept_indices[images], pruned_alone.kept_indices)
        row = pruned.attention_mask[sample].bool()
        torch.testing.assert_close(logits[sample][row], logits_alone[0], rtol=1e-5, atol=1e-5)
        alone_new = wrapped.generate(**alone, max_new_tokens=4, do_sample=False)
        assert torch.equal(new[sample], alone_new[0, alone["input_ids"].shape[1]:])
    side = pruned.attention_mask[:, -1] if padding_side == "left" else pruned.attention_mask[:, 0]
    assert side.all()


def assert_eager_equals_sdpa(load, inputs):
    """The same kept tokens, logits and greedy tokens with ``load(attn="eager")`` and
    ``load(attn="sdpa")`` (each a wrapped model)."""
    results = []
    for attn in ("eager", "sdpa"):
        wrapped = load(attn=attn)
        assert wrapped.model.config._attn_implementation == attn
        with torch.no_grad():
            pruned = wrapped.prune_inputs(**inputs)
            logits = wrapped(**inputs).logits
        new = wrapped.generate(**inputs, max_new_tokens=4, do_sample=False)
        results.append((pruned.kept_indices, logits, pruned.attention_mask.bool(), new))
    (kept_e, logits_e, mask, new_e), (kept_s, logits_s, _, new_s) = results
    assert torch.equal(kept_e, kept_s)
    torch.testing.assert_close(logits_e[mask], logits_s[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(new_e, new_s)


def assert_keep_all_reproduces_the_model(wrapped, inputs):
    """With ``wrapped.keep`` >= every item's tokens: the unwrapped model's logits exactly (at the
    real tokens; positions from the mask, as ``generate`` derives them) and its greedy tokens.
    Returns (PrunedInputs, logits)."""
    mask = inputs["attention_mask"]
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
        logits = wrapped(**inputs).logits
        reference = wrapped.model(**inputs, position_ids=position_ids_from_mask(mask)).logits
    assert torch.equal(pruned.attention_mask, mask)
    for got, want in zip(real_rows(logits, mask), real_rows(reference, mask)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    new = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        full = wrapped.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(new, full)  # as Hugging Face: the prompt ids, then the new tokens
    return pruned, logits
