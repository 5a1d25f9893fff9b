"""ZSPAPruneInternVL on a tiny offline InternVL (random weights, built per session): dynamic
tiles plus a thumbnail per image, several images per sample, video frames."""
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

import zspaprune_ops  # noqa: E402
import zspaprune_ops.reference  # noqa: E402
from family_checks import (Recorder, assert_batch_equals_samples,  # noqa: E402
                           assert_eager_equals_sdpa, assert_keep_all_reproduces_the_model,
                           assert_pruned_run_equals_full_run_with_holes, kept_flags,
                           question_tokens, real_rows, wrap)
from zspaprune_ops import ZSPAPruneModel  # noqa: E402
from zspaprune_ops.models.internvl import ZSPAPruneInternVL  # noqa: E402
from zspaprune_ops.models.sequence import position_ids_from_mask  # noqa: E402
from zspaprune_ops.processors import load_processor  # noqa: E402
from zspaprune_ops.testing import tiny_internvl  # noqa: E402

TEMPLATE = Path(__file__).parent / "data" / "chat_templates" / "internvl3.jinja"
QUESTIONS = ("What is shown in the image?", "Where is the cat, left or right?")
SYSTEM = "You are a careful assistant. Look twice."
SIZES = [(40, 90), (32, 32), (50, 30)]  # 2 tiles + thumbnail, 1 tile, 6 tiles + thumbnail
TILES = [3, 1, 7]


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return tiny_internvl.build_tiny_internvl(tmp_path_factory.mktemp("tiny_internvl"), seed=4)


def load(folder, keep=5, ratio=0.5, attn="sdpa", **kwargs) -> ZSPAPruneInternVL:
    """The wrapped tiny model, its processor's chat template given."""
    return wrap(folder, processor(folder), keep, ratio, attn, **kwargs)


def processor(folder, padding_side="left"):
    proc = load_processor(folder)
    proc.tokenizer.padding_side = padding_side
    return proc


def pictures(seed, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def user(images=0, videos=0, text=QUESTIONS[0]):
    return {"role": "user", "content": [{"type": "image"}] * images +
            [{"type": "video"}] * videos + [{"type": "text", "text": text}]}


def batch(folder, video=False, padding_side="left", seed=0):
    """Sample 0: one image of 3 tiles (and a 2-frame video); sample 1: two images (1 and 7
    tiles). Processor outputs, padded on ``padding_side``."""
    proc = processor(folder, padding_side)
    texts = [proc.apply_chat_template([user(1, int(video), QUESTIONS[0])],
                                      add_generation_prompt=True),
             proc.apply_chat_template([user(2, 0, QUESTIONS[1])], add_generation_prompt=True)]
    videos = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))] \
        if video else None
    return dict(proc(images=pictures(seed), videos=videos, text=texts, return_tensors="pt",
                     padding=True, padding_side=padding_side))


def features(model, inputs, lengths):
    """Projector outputs of every tile, straight from the model, cut into ``lengths``."""
    with torch.no_grad():
        tiles = model.get_image_features(pixel_values=inputs["pixel_values"],
                                         return_dict=True).pooler_output
    return list(tiles.flatten(0, 1).split(lengths))


def kept_tokens(model, inputs, pruned):
    ids = inputs["input_ids"]
    placeholders = ids == model.config.image_token_id
    return (inputs["attention_mask"].bool() & ~placeholders) | \
        kept_flags(placeholders, pruned.kept_indices, pruned.image_features)


def test_keep_everything_reproduces_the_unwrapped_model(folder):
    inputs = batch(folder, video=True)
    assert not inputs["attention_mask"].all()
    assert_keep_all_reproduces_the_model(load(folder, keep=10_000), inputs)


@pytest.mark.parametrize("keep,ratio", [(5, 0.5), (20, 1.0), (3, 0.0)])
def test_one_selection_over_all_tiles_of_an_image_equals_the_reference(folder, keep, ratio):
    """An image is one item: its tiles and thumbnail together (not ``keep`` per tile), selected
    as the reference selects on the same projector outputs; the markers stay."""
    wrapped = load(folder, keep=keep, ratio=ratio)
    inputs = batch(folder, seed=keep)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    config = wrapped.model.config
    placeholders = ids == config.image_token_id
    prompt_mask = (torch.cumsum(placeholders.flip(1).long(), 1).flip(1) == 0) & mask.bool()
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs, prompt_mask=prompt_mask)
        embeds = wrapped.model.get_input_embeddings()(ids)
    per_tile = config.image_seq_length
    images = features(wrapped.model, inputs, [n * per_tile for n in TILES])
    assert [f.shape[0] for f in pruned.image_features] == [n * per_tile for n in TILES]
    assert pruned.kept_indices.shape == (len(TILES), keep)
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
    tokenizer = processor(folder).tokenizer
    markers = (ids == tokenizer.start_image_token_id) | (ids == tokenizer.end_image_token_id)
    assert int(markers.sum()) == 2 * len(TILES) and bool(flags[markers].all())
    for got, row, keep_row in zip(real_rows(pruned.inputs_embeds, pruned.attention_mask), full,
                                  flags):
        torch.testing.assert_close(got, row[keep_row], rtol=0, atol=0)


def test_video_frames_are_one_item_each(folder):
    """InternVL's model sees a video as frames, each its own ``Frame<i>: <img>...</img>`` run."""
    inputs = batch(folder, video=True, seed=2)
    with torch.no_grad():
        pruned = load(folder, keep=4).prune_inputs(**inputs)
    per_tile = 16
    assert [f.shape[0] // per_tile for f in pruned.image_features] == [3, 1, 1, 1, 7]
    assert ((pruned.kept_indices >= 0).sum(1) == 4).all()


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_pruned_run_equals_the_full_run_with_the_pruned_tokens_masked_out(folder, positions):
    wrapped = load(folder, keep=4, positions=None if positions == "compact" else positions)
    assert wrapped.positions == positions
    inputs = batch(folder, video=True, seed=7)
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
    holes = kept_tokens(wrapped.model, inputs, pruned)
    mask = holes if positions == "compact" else inputs["attention_mask"]
    assert_pruned_run_equals_full_run_with_holes(wrapped, inputs, holes,
                                                 position_ids_from_mask(mask))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_per_sample_runs(folder, padding_side):
    inputs = batch(folder, padding_side=padding_side, seed=5)
    assert not inputs["attention_mask"].all()
    samples = []
    for sample, (images, tiles) in enumerate(((slice(0, 1), slice(0, 3)),
                                              (slice(1, 3), slice(3, 11)))):
        real = inputs["attention_mask"][sample].bool()
        samples.append(({"input_ids": inputs["input_ids"][sample:sample + 1, real],
                         "pixel_values": inputs["pixel_values"][tiles]}, images))
    assert_batch_equals_samples(load(folder, keep=6), inputs, samples, padding_side)


def test_eager_and_sdpa_attention_give_the_same_results(folder):
    assert_eager_equals_sdpa(lambda attn: load(folder, keep=5, attn=attn), batch(folder, seed=9))


def chat_prompts(folder, video):
    """The prompt rows each item is scored against, for a chat in InternVL's template
    (``<IMG_CONTEXT>`` per image, expanded by the processor to ``<img><IMG_CONTEXT>...</img>``):
    a system prompt, two turns, one image then two (and a video); and each question's tokens'
    embeddings."""
    proc = processor(folder)
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                user(1, 0, QUESTIONS[0]),
                {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
                user(2, int(video), QUESTIONS[1])]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    videos = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))] \
        if video else None
    inputs = dict(proc(images=pictures(2), videos=videos, text=[text], return_tensors="pt"))
    recorder = Recorder()
    model = load(folder).model
    zspaprune_ops.prune(model, keep=4, processor=proc, selector=recorder).prune_inputs(**inputs)
    ids = inputs["input_ids"][0].tolist()
    embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
    first, second = (embeds[question_tokens(proc.tokenizer, ids, q)] for q in QUESTIONS)
    return recorder.prompts, first, second


def test_each_image_is_scored_against_its_own_user_message(folder):
    prompts, first, second = chat_prompts(folder, video=False)
    assert len(prompts) == 3
    for got, want in zip(prompts, (first, second, second)):
        assert torch.equal(got, want)


def test_video_frames_are_scored_against_their_user_message(folder):
    prompts, first, second = chat_prompts(folder, video=True)
    assert len(prompts) == 5  # three images, then the video's two frames
    for got, want in zip(prompts, (first, second, second, second, second)):
        assert torch.equal(got, want)


def test_front_door_builders_and_the_8b_preset(folder):
    from transformers import InternVLForConditionalGeneration

    wrapped = ZSPAPruneModel.from_pretrained(folder, keep=7, relevance_ratio=0.25)
    assert type(wrapped) is ZSPAPruneInternVL and wrapped.layout is not None
    assert (wrapped.keep, wrapped.relevance_ratio, wrapped.positions) == (7, 0.25, "compact")
    saved = InternVLForConditionalGeneration.from_pretrained(folder).state_dict()
    built = tiny_internvl.build_model(seed=4).state_dict()
    assert all(torch.equal(saved[name], built[name]) for name in built)
    # the current converter's template: the first one's '<image>' placeholder, which
    # transformers 5's processor no longer expands, written as '<IMG_CONTEXT>'
    first = TEMPLATE.read_text()
    assert tiny_internvl.CHAT_TEMPLATE == first.replace("'<image>\n'", "'<IMG_CONTEXT>\n'")
    big = tiny_internvl.build_model(device="meta", dtype=torch.bfloat16,
                                    **tiny_internvl.INTERNVL3_8B_SIZES)
    # InternVL3-8B-hf's 7.94 B (as recalled from its model card)
    assert sum(p.numel() for p in big.parameters()) == 7_944_300_032
    with pytest.raises(ValueError, match="size"):
        tiny_internvl.build_model(hidden=3)


def test_bad_arguments_raise_clear_errors(folder):
    wrapped = load(folder)
    inputs = batch(folder)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with pytest.raises(TypeError, match="model must be a InternVL"):
        ZSPAPruneInternVL(wrapped.model.model.language_model)
    with pytest.raises(ValueError, match=r"pixel_values must be a \[tiles, 3, S, S\]"):
        wrapped.prune_inputs(ids, pixels[None])
    with pytest.raises(ValueError, match="runs of"):
        wrapped.prune_inputs(ids, pixels[:-1])
    with pytest.raises(ValueError, match="labels"):
        wrapped(**inputs, labels=ids)
    with pytest.raises(ValueError, match="positions"):
        zspaprune_ops.prune(wrapped.model, positions="shifted")
