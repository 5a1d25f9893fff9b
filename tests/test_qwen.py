"""ZSPAPruneQwen2_5_VL / ZSPAPruneQwen3VL on tiny offline models (random weights, built per session)."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil)

import zspaprune_ops  # noqa: E402
import zspaprune_ops.reference  # noqa: E402
from zspaprune_ops import ZSPAPruneModel, prune  # noqa: E402
from zspaprune_ops.models.qwen2_5_vl import ZSPAPruneQwen2_5_VL  # noqa: E402
from zspaprune_ops.models.qwen3_vl import ZSPAPruneQwen3VL  # noqa: E402
from zspaprune_ops.testing.tiny_qwen import KINDS, build_tiny_qwen, encode, video_inputs  # noqa: E402
from family_checks import Recorder, question_tokens  # noqa: E402

QUESTIONS = ("What is shown in the picture?", "Where is the cat?",
             "How many objects are there, left and right?")
SIZES = [(32, 40), (48, 32), (40, 56), (32, 32)]


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen")
    return {kind: build_tiny_qwen(root / kind, kind, seed=2) for kind in KINDS}


_models, _tools = {}, {}


def load(folders, kind, keep=5, ratio=0.5, attn="sdpa", **kwargs):
    key = (kind, attn)
    if key not in _models:
        _models[key] = ZSPAPruneModel.from_pretrained(folders[kind], attn_implementation=attn).model
    return prune(_models[key], keep, ratio, **kwargs)


def tools(folders, kind):
    if kind not in _tools:
        _tools[kind] = (AutoTokenizer.from_pretrained(folders[kind]),
                        Qwen2VLImageProcessorPil.from_pretrained(folders[kind]))
    return _tools[kind]


def prompt(tokenizer, question, images=1, video_text=""):
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    return text.replace("<|im_start|>user\n", "<|im_start|>user\n" + video_text)


def batch(folders, kind, images_per_sample=(2, 1), video=False, padding_side="left", seed=0):
    """Processor-like inputs: sample i holds ``images_per_sample[i]`` random images (and sample
    0 a video, with ``video``)."""
    tokenizer, image_processor = tools(folders, kind)
    rng = np.random.default_rng(seed)
    images, texts, videos = [], [], []
    for sample, count in enumerate(images_per_sample):
        for h, w in SIZES[len(images):len(images) + count]:
            images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        video_text = ""
        if video and sample == 0:
            videos.append(video_inputs(_models[(kind, "sdpa")].config, 4, 16, 24, seed=seed))
            video_text = videos[0][0]
        texts.append(prompt(tokenizer, QUESTIONS[sample], count, video_text))
    return encode(tokenizer, image_processor, texts, images, videos, padding_side)


def original_positions(model, inputs):
    rope = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
            if k in inputs}
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              attention_mask=inputs["attention_mask"], **rope)
    return positions


def features(model, inputs):
    """Merger outputs per image and per video, straight from the model."""
    with torch.no_grad():
        images = list(model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                               return_dict=True).pooler_output)
        videos = []
        if "pixel_values_videos" in inputs:
            videos = list(model.get_video_features(inputs["pixel_values_videos"],
                                                   inputs["video_grid_thw"],
                                                   return_dict=True).pooler_output)
    return images, videos


def kept_tokens(model, inputs, pruned):
    """bool [B, L]: the tokens of the unpruned sequence the pruned one keeps (from kept_indices)."""
    ids = inputs["input_ids"]
    keep = inputs["attention_mask"].bool().clone()
    for token_id, kept in ((model.config.image_token_id, pruned.kept_indices),
                           (model.config.video_token_id, pruned.kept_video_indices)):
        placeholders = ids == token_id
        if kept is None:
            continue
        flags = []
        for row, feature in zip(kept, pruned.image_features if token_id ==
                                model.config.image_token_id else pruned.video_features):
            flag = torch.zeros(feature.shape[0], dtype=torch.bool)
            flag[row[row >= 0]] = True
            flags.append(flag)
        keep[placeholders] &= torch.cat(flags)
    return keep


def item_samples(placeholders, items):
    """The sample of each item: items fill the placeholders in batch order."""
    counts, samples = iter(item.shape[0] for item in items), []
    for sample, tokens in enumerate(placeholders.sum(1).tolist()):
        while tokens > 0:
            tokens -= next(counts)
            samples.append(sample)
    return samples


def real(tensor, mask):
    return [row[m.bool()] for row, m in zip(tensor, mask)]


@pytest.mark.parametrize("kind", KINDS)
def test_keep_everything_reproduces_the_unwrapped_model(folders, kind):
    wrapped = load(folders, kind, keep=10_000)
    inputs = batch(folders, kind, video=True)
    assert not inputs["attention_mask"].all()
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
        logits = wrapped(**inputs).logits
        reference = wrapped.model(**inputs).logits
    mask = inputs["attention_mask"]
    assert torch.equal(pruned.attention_mask, mask)
    assert torch.equal(pruned.position_ids, original_positions(wrapped.model, inputs))
    for got, want in zip(real(logits, mask), real(reference, mask)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    new = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        full = wrapped.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(new, full)  # as Hugging Face: the prompt ids, then the new tokens


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep,ratio,question_only", [(5, 0.5, False), (7, 1.0, True),
                                                      (3, 0.0, False)])
def test_kept_tokens_are_the_merger_outputs_the_reference_selects(folders, kind, keep, ratio,
                                                                  question_only):
    wrapped = load(folders, kind, keep=keep, ratio=ratio)
    inputs = batch(folders, kind, video=True, seed=keep)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    config = wrapped.model.config
    visual = (ids == config.image_token_id) | (ids == config.video_token_id)
    prompt_mask = None
    if question_only:  # the tokens after the last visual token only
        prompt_mask = (torch.cumsum(visual.flip(1).long(), dim=1).flip(1) == 0) & mask.bool()
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs, prompt_mask=prompt_mask)
        embeds = wrapped.model.get_input_embeddings()(ids)
    images, videos = features(wrapped.model, inputs)
    assert pruned.kept_indices.shape == (len(images), keep)
    assert pruned.kept_video_indices.shape == (len(videos), keep)
    samples = (item_samples(ids == config.image_token_id, images)
               + item_samples(ids == config.video_token_id, videos))
    kept_rows = list(pruned.kept_indices) + list(pruned.kept_video_indices)
    for item, (feature, sample, kept) in enumerate(zip(images + videos, samples, kept_rows)):
        text = mask[sample].bool() & ~visual[sample]
        if prompt_mask is not None:
            text &= prompt_mask[sample]
        want = zspaprune_ops.reference.select(feature, embeds[sample][text], keep, ratio)
        assert torch.equal(kept, want), item
    # the shortened sequence: real text tokens and the kept merger outputs, in order
    keep_flags = kept_tokens(wrapped.model, inputs, pruned)
    full = embeds.masked_scatter((ids == config.image_token_id)[..., None], torch.cat(images))
    full = full.masked_scatter((ids == config.video_token_id)[..., None], torch.cat(videos))
    for got, row, flags in zip(real(pruned.inputs_embeds, pruned.attention_mask), full,
                               keep_flags):
        torch.testing.assert_close(got, row[flags], rtol=0, atol=0)
    positions = original_positions(wrapped.model, inputs)
    for b in range(ids.shape[0]):
        assert torch.equal(pruned.position_ids[:, b][:, pruned.attention_mask[b].bool()],
                           positions[:, b][:, keep_flags[b]])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("video", [False, True])
def test_pruned_run_equals_the_full_run_with_the_pruned_tokens_masked_out(folders, kind, video):
    """Prefill and 4 greedy steps: original positions make pruning the same as removing the
    pruned tokens from attention in the unpruned sequence."""
    wrapped = load(folders, kind, keep=4)
    inputs = batch(folders, kind, video=video, seed=7)
    steps = 4
    out = wrapped.generate(**inputs, max_new_tokens=steps, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
        logits = wrapped(**inputs).logits
    assert torch.equal(out.kept_indices, pruned.kept_indices)  # from the same call
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + steps
    holes = kept_tokens(wrapped.model, inputs, pruned).long()
    positions = original_positions(wrapped.model, inputs)
    ids = inputs["input_ids"]
    model_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for step in range(steps):
        with torch.no_grad():
            full = wrapped.model(input_ids=ids, attention_mask=holes, position_ids=positions,
                                 **model_inputs).logits
        if step == 0:
            for got, want in zip(real(logits, pruned.attention_mask), real(full, holes)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.logits[step], full[:, -1], rtol=1e-4, atol=1e-4)
        token = out.sequences[:, inputs["input_ids"].shape[1] + step][:, None]
        assert torch.equal(token[:, 0], full[:, -1].argmax(-1))
        ids = torch.cat([ids, token], 1)
        holes = torch.cat([holes, torch.ones_like(token)], 1)
        positions = torch.cat([positions, positions[..., -1:] + 1], -1)
        model_inputs["mm_token_type_ids"] = torch.cat(
            [model_inputs["mm_token_type_ids"], torch.zeros_like(token)], 1)
    # the model's rope_deltas match the pruned sequence: a cached forward without positions
    # continues where generate would
    assert torch.equal(wrapped.model.model.rope_deltas, pruned.rope_deltas)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_per_sample_runs(folders, kind, padding_side):
    wrapped = load(folders, kind, keep=6)
    inputs = batch(folders, kind, video=True, padding_side=padding_side, seed=5)
    assert not inputs["attention_mask"].all()
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
        logits = wrapped(**inputs).logits
    new = wrapped.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = new[:, inputs["input_ids"].shape[1]:]
    grids = inputs["image_grid_thw"].prod(-1).tolist()
    first = 0
    for sample, count in enumerate((2, 1)):
        alone = {k: v[sample:sample + 1] for k, v in inputs.items()
                 if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        real_tokens = alone["attention_mask"][0].bool()
        alone = {k: v[:, real_tokens] for k, v in alone.items()}
        start = sum(grids[:first])
        alone["pixel_values"] = inputs["pixel_values"][start:start + sum(grids[first:first + count])]
        alone["image_grid_thw"] = inputs["image_grid_thw"][first:first + count]
        if sample == 0:
            for name in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
                if name in inputs:
                    alone[name] = inputs[name]
        with torch.no_grad():
            pruned_alone = wrapped.prune_inputs(**alone)
            logits_alone = wrapped(**alone).logits
        assert torch.equal(pruned.kept_indices[first:first + count], pruned_alone.kept_indices)
        row = pruned.attention_mask[sample].bool()
        assert torch.equal(pruned.position_ids[:, sample][:, row], pruned_alone.position_ids[:, 0])
        torch.testing.assert_close(logits[sample][row], logits_alone[0], rtol=1e-4, atol=1e-4)
        alone_new = wrapped.generate(**alone, max_new_tokens=4, do_sample=False)
        assert torch.equal(new[sample], alone_new[0, alone["input_ids"].shape[1]:])
        first += count
    side = pruned.attention_mask[:, -1] if padding_side == "left" else pruned.attention_mask[:, 0]
    assert side.all()


@pytest.mark.parametrize("kind", KINDS)
def test_eager_and_sdpa_attention_give_the_same_results(folders, kind):
    results = []
    for attn in ("eager", "sdpa"):
        wrapped = load(folders, kind, keep=5, attn=attn)
        inputs = batch(folders, kind, seed=9)
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


def test_torch_compile_of_the_wrapped_forward(folders):
    # Qwen3-VL runs all of Qwen2.5-VL's code plus the DeepStack hook; tracing takes ~30 s
    wrapped = load(folders, "qwen3_vl", keep=5)
    inputs = batch(folders, "qwen3_vl", seed=11)
    with torch.no_grad():
        eager = wrapped(**inputs).logits
        compiled = torch.compile(wrapped, backend="eager")(**inputs).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_compact_positions_number_the_shortened_sequence(folders, kind):
    wrapped = load(folders, kind, keep=3, positions="compact")
    inputs = batch(folders, kind, seed=12)
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
    mask = pruned.attention_mask
    expected = (mask.cumsum(1) - 1).clamp(min=0) * mask
    assert torch.equal(pruned.position_ids, expected[None].expand(3, -1, -1))
    assert torch.equal(pruned.rope_deltas, torch.zeros_like(pruned.rope_deltas))


def test_front_door_picks_the_family_and_unwraps(folders):
    for kind, cls in zip(KINDS, (ZSPAPruneQwen2_5_VL, ZSPAPruneQwen3VL)):
        wrapped = load(folders, kind, keep=7, ratio=0.25)
        assert type(wrapped) is cls and wrapped.positions == "original"
        assert (wrapped.keep, wrapped.relevance_ratio) == (7, 0.25)
        assert wrapped.unwrap() is wrapped.model
        assert type(ZSPAPruneModel(wrapped.model, keep=3)) is cls
    with pytest.raises(TypeError, match="Qwen2_5_VLForConditionalGeneration.*got Linear"):
        prune(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_arguments_raise_clear_errors(folders, kind):
    wrapped = load(folders, kind)
    model = wrapped.model
    inputs = batch(folders, kind, images_per_sample=(1,))
    for kwargs, error, words in [
            (dict(keep=0), ValueError, "keep"), (dict(keep=2.0), ValueError, "keep"),
            (dict(relevance_ratio=1.5), ValueError, "relevance_ratio"),
            (dict(backend="cuda"), ValueError, "backend"),
            (dict(positions="shifted"), ValueError, "positions")]:
        with pytest.raises(error, match=words):
            prune(model, **kwargs)
    with pytest.raises(TypeError, match="model must be a Qwen"):
        type(wrapped)(model.model.language_model)
    two_images = batch(folders, kind, images_per_sample=(2,))
    with pytest.raises(ValueError, match="image tokens"):
        wrapped.prune_inputs(**{**inputs, "pixel_values": two_images["pixel_values"],
                                "image_grid_thw": two_images["image_grid_thw"]})
    with pytest.raises(ValueError, match="pixel_values is None"):
        wrapped.prune_inputs(inputs["input_ids"], None, pixel_values_videos=torch.zeros(4, 96),
                             video_grid_thw=torch.tensor([[1, 2, 2]]))
    with pytest.raises(TypeError, match="image_grid_thw"):
        wrapped.prune_inputs(inputs["input_ids"], inputs["pixel_values"])
    with pytest.raises(ValueError, match="labels"):
        wrapped(**inputs, labels=inputs["input_ids"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_negative_index_from_the_op_raises_instead_of_becoming_a_position(folders, kind):
    def failed(visual, prompt, keep, ratio, prompt_mask, visual_mask):  # the op's GPU failure
        return torch.full((visual.shape[0], keep), -1, dtype=torch.int64)

    wrapped = zspaprune_ops.prune(load(folders, kind, keep=4).model, keep=4, selector=failed)
    inputs = batch(folders, kind, images_per_sample=(1,))
    with pytest.raises(RuntimeError, match="negative index"):
        wrapped.prune_inputs(**inputs)


# ------------------------------------------------------------------ the relevance prompt
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
CHAT_QUESTIONS = ("Where is the cat?", "How many objects are there, left and right?")


@pytest.mark.parametrize("kind", KINDS)
def test_each_image_is_scored_against_its_own_user_message(folders, kind):
    """The checkpoint's real template (Qwen2.5-VL's inserts a default system prompt; here a
    custom one), two turns, one image then two: each image's prompt is its question."""
    tokenizer, image_processor = tools(folders, kind)
    template = (TEMPLATES / f"{kind}.jinja").read_text()
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": CHAT_QUESTIONS[0]}]},
                {"role": "assistant", "content": [{"type": "text", "text": "On the left."}]},
                {"role": "user", "content": [{"type": "text", "text": CHAT_QUESTIONS[1]},
                                             {"type": "image"}, {"type": "image"}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    rng = np.random.default_rng(4)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                for h, w in SIZES[:3]]
    inputs = encode(tokenizer, image_processor, [text], pictures)
    recorder = Recorder()
    checkpoint = SimpleNamespace(tokenizer=tokenizer, chat_template=template)  # a processor
    wrapped = load(folders, kind, keep=3, selector=recorder, processor=checkpoint)
    wrapped.prune_inputs(**inputs)
    ids = inputs["input_ids"][0].tolist()
    embeds = wrapped.model.get_input_embeddings()(inputs["input_ids"])[0]
    first, second = (question_tokens(tokenizer, ids, q) for q in CHAT_QUESTIONS)
    assert len(recorder.prompts) == 3
    for got, positions in zip(recorder.prompts, (first, second, second)):
        assert torch.equal(got, embeds[positions])


def test_from_pretrained_finds_the_template_without_torchvision(folders):
    wrapped = ZSPAPruneModel.from_pretrained(folders["qwen2_5_vl"], keep=4)
    assert wrapped.layout is not None  # from chat_template.jinja, through the tokenizer


def test_a_video_is_scored_against_its_message_without_the_timestamps(folders):
    """Qwen3-VL's processor writes ``<t seconds>`` before each temporal group of a video, inside
    the user's message: that text is not the user's words."""
    recorder = Recorder()
    tokenizer, _ = tools(folders, "qwen3_vl")
    wrapped = load(folders, "qwen3_vl", keep=3, selector=recorder, processor=tokenizer)
    inputs = batch(folders, "qwen3_vl", images_per_sample=(1,), video=True, seed=5)
    assert "seconds>" in tokenizer.decode(inputs["input_ids"][0])
    wrapped.prune_inputs(**inputs)
    question = question_tokens(tokenizer, inputs["input_ids"][0].tolist(), QUESTIONS[0])
    embeds = wrapped.model.get_input_embeddings()(inputs["input_ids"])[0]
    assert len(recorder.prompts) == 2  # the image, then the video: one message
    for got in recorder.prompts:
        assert torch.equal(got, embeds[question])
