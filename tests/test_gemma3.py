"""ZSPAPruneGemma3 on a tiny offline Gemma 3 (random weights, built per session): bidirectional
image attention from token_type_ids, pan-and-scan crops, sliding-window layers."""
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

import zspaprune_ops  # noqa: E402
import zspaprune_ops.reference  # noqa: E402
from family_checks import (Recorder, assert_batch_equals_samples,  # noqa: E402
                           assert_eager_equals_sdpa, assert_keep_all_reproduces_the_model,
                           assert_pruned_run_equals_full_run_with_holes, kept_flags,
                           question_tokens, real_rows, wrap)
from zspaprune_ops import ZSPAPruneModel  # noqa: E402
from zspaprune_ops.models.gemma3 import ZSPAPruneGemma3  # noqa: E402
from zspaprune_ops.models.sequence import placeholder_runs, position_ids_from_mask  # noqa: E402
from zspaprune_ops.testing import tiny_gemma3  # noqa: E402

TEMPLATE = Path(__file__).parent / "data" / "chat_templates" / "gemma3.jinja"
QUESTIONS = ("What is shown in the image?", "Where is the cat, left or right?")
SYSTEM = "You are a careful assistant. Look twice."
# sample 0: a wide image (original + 3 crops); sample 1: a tall one (original + 2 crops) and,
# right after it in the same message, a square one (no crops)
SIZES = [(32, 96), (50, 30), (32, 32)]
VIEWS = [4, 3, 1]
PAN_AND_SCAN = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=16)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return tiny_gemma3.build_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"), seed=5)


def load(folder, keep=5, ratio=0.5, attn="sdpa", **kwargs) -> ZSPAPruneGemma3:
    """The wrapped tiny model, its processor's chat template given."""
    return wrap(folder, processor(folder), keep, ratio, attn, **kwargs)


def processor(folder):
    return AutoProcessor.from_pretrained(folder)


def pictures(seed, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def user(images=0, text=QUESTIONS[0]):
    return {"role": "user", "content": [{"type": "image"}] * images +
            [{"type": "text", "text": text}]}


def batch(folder, padding_side="left", seed=0, pan_and_scan=True):
    proc = processor(folder)
    texts = [proc.apply_chat_template([user(1, QUESTIONS[0])], add_generation_prompt=True),
             proc.apply_chat_template([user(2, QUESTIONS[1])], add_generation_prompt=True)]
    images = pictures(seed)
    return dict(proc(images=[images[:1], images[1:]], text=texts, return_tensors="pt",
                     padding=True, padding_side=padding_side,
                     **(PAN_AND_SCAN if pan_and_scan else {})))


def views(model, inputs):
    with torch.no_grad():
        return model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output


def kept_tokens(model, inputs, pruned):
    placeholders = inputs["input_ids"] == model.config.image_token_id
    return (inputs["attention_mask"].bool() & ~placeholders) | \
        kept_flags(placeholders, pruned.kept_indices, pruned.image_features)


def grow_type_ids(extra, token):
    return {**extra, "token_type_ids": torch.cat([extra["token_type_ids"],
                                                  torch.zeros_like(token)], 1)}


def test_keep_everything_reproduces_the_unwrapped_model(folder):
    wrapped = load(folder, keep=10_000)
    inputs = batch(folder)
    mask = inputs["attention_mask"]
    assert not mask.all()
    pruned, logits = assert_keep_all_reproduces_the_model(wrapped, inputs)
    assert torch.equal(pruned.forward_kwargs["token_type_ids"], inputs["token_type_ids"])
    with torch.no_grad():  # without token_type_ids the model runs causal: another result
        causal = wrapped.model(**{k: v for k, v in inputs.items() if k != "token_type_ids"},
                               position_ids=position_ids_from_mask(mask)).logits
    for got, plain in zip(real_rows(logits, mask), real_rows(causal, mask)):
        assert not torch.allclose(got, plain, atol=1e-3)


@pytest.mark.parametrize("keep,ratio", [(5, 0.5), (20, 1.0), (3, 0.0)])
def test_one_selection_over_all_views_of_an_image_equals_the_reference(folder, keep, ratio):
    """An image with pan-and-scan crops is one item: its views together, selected as the
    reference selects on the same projector outputs; the markers and the processor's text
    stay."""
    wrapped = load(folder, keep=keep, ratio=ratio)
    inputs = batch(folder, seed=keep)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    config = wrapped.model.config
    placeholders = ids == config.image_token_id
    prompt_mask = (torch.cumsum(placeholders.flip(1).long(), 1).flip(1) == 0) & mask.bool()
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs, prompt_mask=prompt_mask)
        embeds = wrapped.model.get_input_embeddings()(ids.masked_fill(placeholders, 0))
    per_view = config.mm_tokens_per_image
    images = list(views(wrapped.model, inputs).flatten(0, 1).split([n * per_view
                                                                   for n in VIEWS]))
    assert [f.shape[0] for f in pruned.image_features] == [n * per_view for n in VIEWS]
    assert pruned.kept_indices.shape == (len(VIEWS), keep)
    for feature, sample, kept, got in zip(images, (0, 1, 1), pruned.kept_indices,
                                          pruned.image_features):
        torch.testing.assert_close(got, feature, rtol=0, atol=0)
        kept = kept[kept >= 0]
        if feature.shape[0] <= keep:
            assert torch.equal(kept, torch.arange(feature.shape[0]))
            continue
        want = zspaprune_ops.reference.select(feature, embeds[sample][prompt_mask[sample]], keep,
                                              ratio)
        assert torch.equal(kept, want)
    full = embeds.masked_scatter(placeholders[..., None], torch.cat(images))
    flags = kept_tokens(wrapped.model, inputs, pruned)
    markers = (ids == config.boi_token_id) | (ids == config.eoi_token_id)
    assert int(markers.sum()) == 2 * sum(VIEWS) and bool(flags[markers].all())
    for got, row, keep_row in zip(real_rows(pruned.inputs_embeds, pruned.attention_mask), full,
                                  flags):
        torch.testing.assert_close(got, row[keep_row], rtol=0, atol=0)


def test_views_are_grouped_from_the_processors_text_or_num_crops(folder):
    inputs = batch(folder, seed=3)
    wrapped = load(folder, keep=6)
    with torch.no_grad():
        from_text = wrapped.prune_inputs(**inputs)
        given = wrapped.prune_inputs(**inputs, num_crops=[3, 2, 0])
        every_view = load(folder, keep=6, processor=None, prompt="all").prune_inputs(**inputs)
    assert torch.equal(from_text.kept_indices, given.kept_indices)
    assert [f.shape[0] for f in every_view.image_features] == [16] * sum(VIEWS)
    plain = batch(folder, seed=3, pan_and_scan=False)  # no crops: one view per image
    with torch.no_grad():
        alone = wrapped.prune_inputs(**plain)
    assert [f.shape[0] for f in alone.image_features] == [16, 16, 16]


def test_kept_image_tokens_attend_to_each_other_exactly_as_in_the_full_run(folder):
    """token_type_ids of the shortened sequence: 1 exactly at the kept image tokens, which stay
    one contiguous run per view that keeps any (Gemma 3's bidirectional blocks)."""
    wrapped = load(folder, keep=6)
    inputs = batch(folder, seed=11)
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
    type_ids = pruned.forward_kwargs["token_type_ids"]
    expected = torch.zeros_like(type_ids)
    flags = kept_tokens(wrapped.model, inputs, pruned)
    placeholders = inputs["input_ids"] == wrapped.model.config.image_token_id
    for sample in range(type_ids.shape[0]):
        row = pruned.attention_mask[sample].bool()
        expected[sample, row] = placeholders[sample][flags[sample]].long()
    assert torch.equal(type_ids, expected)
    kept_runs = placeholder_runs(type_ids.bool())
    views_kept = sum(int(flags[placeholders][k * 16:(k + 1) * 16].any())
                     for k in range(sum(VIEWS)))
    assert len(kept_runs) == views_kept


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_pruned_run_equals_the_full_run_with_the_pruned_tokens_masked_out(folder, positions):
    """Prefill and 4 greedy steps, the sequences shorter than the sliding window."""
    wrapped = load(folder, keep=4, positions=None if positions == "compact" else positions)
    assert wrapped.positions == positions
    inputs = batch(folder, seed=7)
    assert inputs["input_ids"].shape[1] < wrapped.model.config.text_config.sliding_window
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
    holes = kept_tokens(wrapped.model, inputs, pruned)
    mask = holes if positions == "compact" else inputs["attention_mask"]
    assert_pruned_run_equals_full_run_with_holes(wrapped, inputs, holes,
                                                 position_ids_from_mask(mask),
                                                 grow=grow_type_ids)


def window_masks(holes, type_ids, window, dtype):
    """Additive [1, 1, L, L] masks of a full run with holes whose sliding window counts kept
    tokens (what the pruned run's sliding layers see), with Gemma 3's bidirectional blocks."""
    length = holes.shape[1]
    kept = holes[0].bool()
    rank = kept.long().cumsum(0) - 1
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    blocks = placeholder_runs(type_ids.bool())
    block = torch.full((length,), -1)
    for number, (_, start, size) in enumerate(blocks):
        block[start:start + size] = number
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    full = ((k <= q) | same) & kept[None, :]
    sliding = full & (rank[None, :] > rank[:, None] - window)
    full, sliding = full | (q == k), sliding | (q == k)  # dropped queries: themselves only
    low = torch.finfo(dtype).min

    def additive(allowed):
        return torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, low)[None, None]

    return {"full_attention": additive(full), "sliding_attention": additive(sliding)}


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_sliding_layers_count_the_window_in_kept_tokens(folder, positions):
    """With a window shorter than the sequence, the pruned run is not the full run with holes
    (whose sliding layers count dropped tokens too); it is the full run with holes whose
    sliding window counts kept tokens, for compact and original positions alike."""
    model = tiny_gemma3.build_model(seed=5, sliding_window=24)
    proc = processor(folder)
    text = proc.apply_chat_template([user(1, QUESTIONS[0])], add_generation_prompt=True)
    inputs = dict(proc(images=pictures(1, SIZES[:1]), text=[text], return_tensors="pt",
                       **PAN_AND_SCAN))
    wrapped = zspaprune_ops.prune(model, keep=6, processor=proc,
                                  positions=None if positions == "compact" else positions)
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
        logits = wrapped(**inputs).logits[0]
    holes = kept_tokens(model, inputs, pruned)
    assert inputs["input_ids"].shape[1] > 2 * 24 and int(holes.sum()) > 24
    positions_full = position_ids_from_mask(holes if positions == "compact"
                                            else inputs["attention_mask"])
    ids, type_ids = inputs["input_ids"], inputs["token_type_ids"]
    with torch.no_grad():
        masks = window_masks(holes, type_ids, 24, logits.dtype)
        counted = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=masks,
                        position_ids=positions_full).logits[0]
        by_index = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                         attention_mask=holes.long(), token_type_ids=type_ids,
                         position_ids=positions_full).logits[0]
    torch.testing.assert_close(logits, counted[holes[0]], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, by_index[holes[0]], atol=1e-3)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_per_sample_runs(folder, padding_side):
    inputs = batch(folder, padding_side=padding_side, seed=5)
    assert not inputs["attention_mask"].all()
    samples = []
    for sample, (images, pixels) in enumerate(((slice(0, 1), slice(0, 4)),
                                               (slice(1, 3), slice(4, 8)))):
        real = inputs["attention_mask"][sample].bool()
        samples.append(({"input_ids": inputs["input_ids"][sample:sample + 1, real],
                         "token_type_ids": inputs["token_type_ids"][sample:sample + 1, real],
                         "pixel_values": inputs["pixel_values"][pixels]}, images))
    assert_batch_equals_samples(load(folder, keep=6), inputs, samples, padding_side)


def test_eager_and_sdpa_attention_give_the_same_results(folder):
    assert_eager_equals_sdpa(lambda attn: load(folder, keep=5, attn=attn), batch(folder, seed=9))


def chat_prompts(folder, pan_and_scan):
    """The prompt rows each image is scored against, for a chat in gemma-3-it's template (which
    writes the system text into the first user turn), two turns, one image then two; and each
    question's tokens' embeddings."""
    proc = processor(folder)
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                user(1, QUESTIONS[0]),
                {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
                user(2, QUESTIONS[1])]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(proc(images=[pictures(2)], text=[text], return_tensors="pt",
                       **(PAN_AND_SCAN if pan_and_scan else {})))
    recorder = Recorder()
    model = load(folder).model
    zspaprune_ops.prune(model, keep=4, processor=proc, selector=recorder).prune_inputs(**inputs)
    ids = inputs["input_ids"][0].tolist()
    embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
    first, second = (embeds[question_tokens(proc.tokenizer, ids, q)] for q in QUESTIONS)
    return recorder.prompts, first, second


def test_each_image_is_scored_against_its_own_user_message(folder):
    prompts, first, second = chat_prompts(folder, pan_and_scan=False)
    assert len(prompts) == 3
    for got, want in zip(prompts, (first, second, second)):
        assert torch.equal(got, want)


def test_pan_and_scan_images_are_scored_against_their_user_message(folder):
    prompts, first, second = chat_prompts(folder, pan_and_scan=True)
    assert len(prompts) == 3
    for got, want in zip(prompts, (first, second, second)):
        assert torch.equal(got, want)


def test_front_door_builders_and_the_4b_preset(folder):
    from transformers import Gemma3ForConditionalGeneration

    wrapped = ZSPAPruneModel.from_pretrained(folder, keep=7, relevance_ratio=0.25)
    assert type(wrapped) is ZSPAPruneGemma3 and wrapped.layout is not None
    assert (wrapped.keep, wrapped.relevance_ratio, wrapped.positions) == (7, 0.25, "compact")
    saved = Gemma3ForConditionalGeneration.from_pretrained(folder).state_dict()
    built = tiny_gemma3.build_model(seed=5).state_dict()
    assert all(torch.equal(saved[name], built[name]) for name in built)
    assert tiny_gemma3.CHAT_TEMPLATE == TEMPLATE.read_text()
    big = tiny_gemma3.build_model(device="meta", dtype=torch.bfloat16,
                                  **tiny_gemma3.GEMMA3_4B_SIZES)
    # gemma-3-4b-it's 4.3 B (as recalled from its model card)
    assert sum(p.numel() for p in big.parameters()) == 4_300_079_472
    assert big.config.text_config.layer_types[:6] == ["sliding_attention"] * 5 + \
        ["full_attention"]
    with pytest.raises(ValueError, match="size"):
        tiny_gemma3.build_model(hidden=3)


def test_bad_arguments_raise_clear_errors(folder):
    wrapped = load(folder)
    inputs = batch(folder)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with pytest.raises(TypeError, match="model must be a Gemma3"):
        ZSPAPruneGemma3(wrapped.model.model.language_model)
    with pytest.raises(ValueError, match=r"pixel_values must be a \[views, 3, S, S\]"):
        wrapped.prune_inputs(ids, pixels[None])
    with pytest.raises(ValueError, match="runs of"):
        wrapped.prune_inputs(ids, pixels[:-1])
    with pytest.raises(ValueError, match=r"num_crops \[1, 1\] gives 4 views"):
        wrapped.prune_inputs(ids, pixels, num_crops=[1, 1])
    with pytest.raises(ValueError, match="labels"):
        wrapped(**inputs, labels=ids)
