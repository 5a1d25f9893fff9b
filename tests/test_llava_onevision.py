"""ZSPAPruneLlavaOnevision on a tiny offline LLaVA-OneVision (random weights, built per session):
any-resolution images, several images per sample (base view + newline), videos."""
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
from zspaprune_ops.models.llava_onevision import ZSPAPruneLlavaOnevision  # noqa: E402
from zspaprune_ops.models.sequence import position_ids_from_mask  # noqa: E402
from zspaprune_ops.processors import load_processor  # noqa: E402
from zspaprune_ops.testing import tiny_onevision  # noqa: E402

TEMPLATE = Path(__file__).parent / "data" / "chat_templates" / "llava_onevision.jinja"
QUESTIONS = ("What is shown in the image?", "Where is the cat, left or right?")
SYSTEM = "You are a careful assistant. Look twice."


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return tiny_onevision.build_tiny_onevision(tmp_path_factory.mktemp("tiny_onevision"), seed=3)


def load(folder, keep=5, ratio=0.5, attn="sdpa", **kwargs) -> ZSPAPruneLlavaOnevision:
    """The wrapped tiny model, its processor's chat template given."""
    return wrap(folder, processor(folder), keep, ratio, attn, **kwargs)


def processor(folder, padding_side="left"):
    proc = load_processor(folder)
    proc.tokenizer.padding_side = padding_side
    return proc


def pictures(seed, sizes):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def user(images=0, videos=0, text=QUESTIONS[0]):
    return {"role": "user", "content": [{"type": "image"}] * images +
            [{"type": "video"}] * videos + [{"type": "text", "text": text}]}


def batch(folder, video=True, padding_side="left", seed=0):
    """Sample 0: one any-resolution image (and a 4-frame video); sample 1: two images (each its
    base view and one newline). Processor outputs, padded on ``padding_side``."""
    proc = processor(folder, padding_side)
    texts = [proc.apply_chat_template([user(1, int(video), QUESTIONS[0])],
                                      add_generation_prompt=True),
             proc.apply_chat_template([user(2, 0, QUESTIONS[1])], add_generation_prompt=True)]
    images = pictures(seed, [(40, 70), (32, 32), (50, 30)])
    videos = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))] \
        if video else None
    return dict(proc(images=[images[:1], images[1:]], videos=videos, text=texts,
                     return_tensors="pt", padding=True))


def features(model, inputs):
    """Projector outputs per image and per video (newlines included), straight from the model."""
    with torch.no_grad():
        images = list(model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"],
            batch_num_images=inputs["batch_num_images"], return_dict=True).pooler_output)
        videos = []
        if "pixel_values_videos" in inputs:
            out = model.get_video_features(inputs["pixel_values_videos"],
                                           return_dict=True).pooler_output
            videos = list(out)
    return images, videos


def newlines(model, feature):
    return (feature == model.model.image_newline.to(feature)).all(-1)


def kept_tokens(model, inputs, pruned):
    ids, config = inputs["input_ids"], model.config
    keep = inputs["attention_mask"].bool() & ~((ids == config.image_token_id) |
                                               (ids == config.video_token_id))
    keep |= kept_flags(ids == config.image_token_id, pruned.kept_indices, pruned.image_features)
    if pruned.kept_video_indices is not None:
        keep |= kept_flags(ids == config.video_token_id, pruned.kept_video_indices,
                           pruned.video_features)
    return keep


def test_keep_everything_reproduces_the_unwrapped_model(folder):
    inputs = batch(folder)
    assert inputs["batch_num_images"].tolist() == [1, 2] and not inputs["attention_mask"].all()
    assert_keep_all_reproduces_the_model(load(folder, keep=10_000), inputs)


@pytest.mark.parametrize("keep,ratio", [(5, 0.5), (9, 1.0), (3, 0.0)])
def test_kept_tokens_are_the_reference_selection_on_the_same_features(folder, keep, ratio):
    wrapped = load(folder, keep=keep, ratio=ratio)
    inputs = batch(folder, seed=keep)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    config = wrapped.model.config
    visual = (ids == config.image_token_id) | (ids == config.video_token_id)
    # the prompt: the tokens after the last visual token (an explicit prompt_mask wins)
    prompt_mask = (torch.cumsum(visual.flip(1).long(), 1).flip(1) == 0) & mask.bool()
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs, prompt_mask=prompt_mask)
        embeds = wrapped.model.get_input_embeddings()(ids)
    images, videos = features(wrapped.model, inputs)
    assert [f.shape[0] for f in images] == [94, 17, 17] and [f.shape[0] for f in videos] == [17]
    assert pruned.kept_indices.shape == (3, keep) and pruned.kept_video_indices.shape == (1, keep)
    samples = [0, 1, 1, 0]  # images in batch order, then the video
    rows = list(pruned.kept_indices) + list(pruned.kept_video_indices)
    for feature, sample, kept in zip(images + videos, samples, rows):
        kept = kept[kept >= 0]
        if feature.shape[0] <= keep:  # a small item stays whole, newline included
            assert torch.equal(kept, torch.arange(feature.shape[0]))
            continue
        candidates = (~newlines(wrapped.model, feature)).nonzero().squeeze(1)
        want = zspaprune_ops.reference.select(feature[candidates],
                                              embeds[sample][prompt_mask[sample]], keep, ratio)
        assert torch.equal(kept, candidates[want])
    # the shortened sequence: real text tokens and the kept projector outputs, in order
    full = embeds.masked_scatter((ids == config.image_token_id)[..., None], torch.cat(images))
    full = full.masked_scatter((ids == config.video_token_id)[..., None], torch.cat(videos))
    flags = kept_tokens(wrapped.model, inputs, pruned)
    for got, row, keep_row in zip(real_rows(pruned.inputs_embeds, pruned.attention_mask), full,
                                  flags):
        torch.testing.assert_close(got, row[keep_row], rtol=0, atol=0)


def test_newline_rows_are_never_candidates_for_each_kind_of_item(folder):
    """Any-resolution image: base tile, then grid rows each closed by a newline; base-only image
    (several in a sample): base tile, one newline; video: pooled frames, one newline."""
    inputs = batch(folder, seed=4)
    model = load(folder).model
    images, videos = features(model, inputs)
    any_res, *base_only = images
    flags = newlines(model, any_res)
    grid = flags[16:].view(-1, int(flags[16:].nonzero()[0]) + 1)
    assert not flags[:16].any() and grid[:, -1].all() and not grid[:, :-1].any()
    for feature in base_only + videos:
        assert newlines(model, feature).nonzero().squeeze(1).tolist() == [feature.shape[0] - 1]
    for keep in (16, 17, 40):  # below, at and above the small items' 17 tokens
        with torch.no_grad():
            pruned = load(folder, keep=keep).prune_inputs(**inputs)
        rows = list(pruned.kept_indices) + list(pruned.kept_video_indices)
        for feature, row in zip(images + videos, rows):
            row = row[row >= 0]
            if feature.shape[0] <= keep:
                assert torch.equal(row, torch.arange(feature.shape[0]))
            else:
                assert not newlines(model, feature)[row].any()
                assert row.numel() == keep


def test_batch_num_images_is_taken_as_the_model_takes_it(folder):
    """Without batch_num_images the model packs every image as an any-resolution one: the
    token counts then disagree with the processor's text, and the wrapper says so."""
    inputs = batch(folder, video=False)
    wrapped = load(folder)
    del inputs["batch_num_images"]
    with pytest.raises(ValueError, match="image tokens but the images give"):
        wrapped.prune_inputs(**inputs)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_pruned_run_equals_the_full_run_with_the_pruned_tokens_masked_out(folder, positions):
    """Prefill and 4 greedy steps; compact positions (the default) = the holes' positions counted
    over the kept tokens, original positions = the unpruned sequence's."""
    wrapped = load(folder, keep=4, positions=None if positions == "compact" else positions)
    assert wrapped.positions == positions
    inputs = batch(folder, seed=7)
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
    for sample, images in enumerate((slice(0, 1), slice(1, 3))):
        real = inputs["attention_mask"][sample].bool()
        alone = {"input_ids": inputs["input_ids"][sample:sample + 1, real],
                 "pixel_values": inputs["pixel_values"][images],
                 "image_sizes": inputs["image_sizes"][images],
                 "batch_num_images": inputs["batch_num_images"][sample:sample + 1]}
        if sample == 0:
            alone["pixel_values_videos"] = inputs["pixel_values_videos"]
        samples.append((alone, images))
    assert_batch_equals_samples(load(folder, keep=6), inputs, samples, padding_side)


def test_eager_and_sdpa_attention_give_the_same_results(folder):
    assert_eager_equals_sdpa(lambda attn: load(folder, keep=5, attn=attn), batch(folder, seed=9))


def test_each_item_is_scored_against_its_own_user_message(folder):
    """The verbatim OneVision template, a system prompt, two turns: the first holds an image,
    the second two images and a video; each item's prompt is its question's tokens."""
    proc = processor(folder)
    assert proc.chat_template == TEMPLATE.read_text()
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                user(1, 0, QUESTIONS[0]),
                {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
                user(2, 1, QUESTIONS[1])]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    video = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs = dict(proc(images=[pictures(2, [(40, 70), (32, 32), (50, 30)])], videos=[video],
                       text=[text], return_tensors="pt"))
    recorder = Recorder()
    model = load(folder).model
    zspaprune_ops.prune(model, keep=4, processor=proc, selector=recorder).prune_inputs(**inputs)
    ids = inputs["input_ids"][0].tolist()
    embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
    first, second = (question_tokens(proc.tokenizer, ids, q) for q in QUESTIONS)
    assert len(recorder.prompts) == 4  # three images, then the video
    for got, positions in zip(recorder.prompts, (first, second, second, second)):
        assert torch.equal(got, embeds[positions])


def test_front_door_builders_and_the_7b_preset(folder):
    from transformers import LlavaOnevisionForConditionalGeneration

    wrapped = ZSPAPruneModel.from_pretrained(folder, keep=7, relevance_ratio=0.25)
    assert type(wrapped) is ZSPAPruneLlavaOnevision and wrapped.layout is not None
    assert (wrapped.keep, wrapped.relevance_ratio, wrapped.positions) == (7, 0.25, "compact")
    assert type(zspaprune_ops.prune(wrapped.model)) is ZSPAPruneLlavaOnevision
    saved = LlavaOnevisionForConditionalGeneration.from_pretrained(folder).state_dict()
    built = tiny_onevision.build_model(seed=3).state_dict()
    assert all(torch.equal(saved[name], built[name]) for name in built)
    assert tiny_onevision.CHAT_TEMPLATE == TEMPLATE.read_text()
    big = tiny_onevision.build_model(device="meta", dtype=torch.bfloat16,
                                     **tiny_onevision.ONEVISION_7B_SIZES)
    # 8.03 B (llava-onevision-qwen2-7b-ov-hf's size as recalled from its model card)
    assert sum(p.numel() for p in big.parameters()) == 8_030_807_584
    with pytest.raises(ValueError, match="size"):
        tiny_onevision.build_model(hidden=3)


def test_bad_arguments_raise_clear_errors(folder):
    wrapped = load(folder)
    inputs = batch(folder)
    ids = inputs["input_ids"]
    with pytest.raises(TypeError, match="model must be a LlavaOnevision"):
        ZSPAPruneLlavaOnevision(wrapped.model.model.language_model)
    with pytest.raises(ValueError, match="image_sizes is required"):
        wrapped.prune_inputs(ids, inputs["pixel_values"])
    with pytest.raises(ValueError, match="pixel_values is None"):
        wrapped.prune_inputs(ids, None, pixel_values_videos=inputs["pixel_values_videos"])
    with pytest.raises(ValueError, match="pixel_values_videos is None"):
        wrapped.prune_inputs(**{k: v for k, v in inputs.items() if k != "pixel_values_videos"})
    with pytest.raises(ValueError, match=r"pixel_values_videos must be a \[videos, frames"):
        wrapped.prune_inputs(**{**inputs, "pixel_values_videos": inputs["pixel_values_videos"][0]})
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor"):
        wrapped.prune_inputs(**{**inputs, "pixel_values": [1, 2]})
    with pytest.raises(ValueError, match="positions"):
        zspaprune_ops.prune(wrapped.model, positions="shifted")
    with pytest.raises(ValueError, match="labels"):
        wrapped(**inputs, labels=ids)
