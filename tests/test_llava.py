"""ZSPAPruneLlava on tiny offline LLaVA / LLaVA-NeXT models (random weights, built per session)."""
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

import zspaprune_ops  # noqa: E402
import zspaprune_ops.reference  # noqa: E402
from zspaprune_ops.models.llava import ZSPAPruneLlava  # noqa: E402
from zspaprune_ops.models.sequence import position_ids_from_mask  # noqa: E402
from zspaprune_ops.testing.tiny_llava import build_tiny_llava  # noqa: E402
from family_checks import Recorder, question_tokens  # noqa: E402

KINDS = ("llava", "llava_next")
PROMPTS = ("USER: <image> What is shown in the image? ASSISTANT:",
           "USER: <image> Where is the cat? ASSISTANT:",
           "USER: <image> <image> How many objects are there, left and right? ASSISTANT:")


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llava")
    return {kind: build_tiny_llava(root / kind, kind, seed=1) for kind in KINDS}


_models = {}


def load(folders, kind, attn="sdpa", dtype=torch.float32, keep=64, ratio=0.5,
         backend="auto") -> ZSPAPruneLlava:
    """The wrapped tiny model (loaded once per kind / attention / dtype)."""
    key = (kind, attn, dtype)
    if key not in _models:
        _models[key] = ZSPAPruneLlava.from_pretrained(folders[kind], attn_implementation=attn,
                                                      dtype=dtype).model
    return ZSPAPruneLlava(_models[key], keep, ratio, backend)


def processor(folders, kind, padding_side="left"):
    proc = AutoProcessor.from_pretrained(folders[kind])
    proc.tokenizer.padding_side = padding_side
    return proc


def images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def batch(folders, kind, prompts, sizes, seed=0, padding_side="left"):
    """Processor outputs for ``prompts`` with random images of ``sizes`` (in placeholder order)."""
    proc = processor(folders, kind, padding_side)
    return dict(proc(images=images(seed, sizes), text=list(prompts), return_tensors="pt",
                     padding=True))


def image_features(model, inputs):
    """Projector outputs per image, straight from the model (independent of the wrapper)."""
    extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    with torch.no_grad():
        out = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True,
                                       **extra)
    return list(out.pooler_output)


def newline_flags(model, feature):
    newline = getattr(model.model, "image_newline", None)
    if newline is None:
        return torch.zeros(feature.shape[0], dtype=torch.bool)
    return (feature == newline.to(feature)).all(dim=-1)


class OpCalls(TorchDispatchMode):
    """Records the ``zspaprune`` ops dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "zspaprune" in str(func):
            self.calls.append(args[0].shape)
        return func(*args, **(kwargs or {}))


def images_per_sample(inputs, features, image_id):
    """The indices of each sample's images (images fill the placeholders in batch order)."""
    result, image = [], 0
    for ids in inputs["input_ids"]:
        tokens, mine = int((ids == image_id).sum()), []
        while tokens > 0:
            tokens -= features[image].shape[0]
            mine.append(image)
            image += 1
        result.append(mine)
    return result


def expected_kept_count(model, feature, keep):
    """Whole image if it has at most ``keep`` tokens, else ``keep`` non-newline tokens (or all)."""
    if feature.shape[0] <= keep:
        return feature.shape[0]
    return min(keep, int((~newline_flags(model, feature)).sum()))


def real_rows(tensor, mask):
    """The real (mask == 1) positions of each row, as a list of tensors."""
    return [row[m.bool()] for row, m in zip(tensor, mask)]


def expected_sequences(model, inputs, kept_indices):
    """Each sample's pruned embedding sequence, rebuilt from input_ids and kept_indices."""
    features = image_features(model, inputs)
    embed = model.get_input_embeddings()
    image_id, image = model.config.image_token_id, 0
    sequences = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids = ids[mask.bool()]
        parts, start = [], 0
        while start < len(ids):
            if ids[start] != image_id:
                parts.append(embed(ids[start:start + 1]))
                start += 1
                continue
            kept = kept_indices[image][kept_indices[image] >= 0]
            parts.append(features[image][kept].to(parts[0].dtype))
            start += features[image].shape[0]
            image += 1
        sequences.append(torch.cat(parts))
    return sequences


@pytest.mark.parametrize("kind", KINDS)
def test_keep_everything_reproduces_the_unwrapped_model(folders, kind):
    sizes = [(32, 32), (40, 70)] if kind == "llava_next" else [(32, 32), (20, 50)]
    inputs = batch(folders, kind, PROMPTS[:2], sizes)
    wrapped = load(folders, kind, keep=10_000)
    model = wrapped.model
    mask = inputs["attention_mask"]
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
        logits = wrapped(**inputs).logits
        reference = model(**inputs, position_ids=position_ids_from_mask(mask)).logits
    assert torch.equal(pruned.attention_mask, mask)
    for got, want in zip(real_rows(logits, mask), real_rows(reference, mask)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    new = wrapped.generate(**inputs, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(new, full)  # as Hugging Face: the prompt ids, then the new tokens


@pytest.mark.parametrize("kind,dtype", [("llava", torch.float32), ("llava", torch.bfloat16),
                                        ("llava_next", torch.float32)])
def test_pruned_sequence_holds_exactly_the_kept_projector_outputs(folders, kind, dtype):
    keep = 5
    prompts = PROMPTS if kind == "llava" else PROMPTS[:2]
    sizes = [(32, 32), (50, 30), (32, 64), (64, 48)][:len(prompts) + (kind == "llava")]
    inputs = batch(folders, kind, prompts, sizes, seed=3)
    wrapped = load(folders, kind, dtype=dtype, keep=keep)
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
    features = image_features(wrapped.model, inputs)
    assert pruned.kept_indices.shape == (len(features), keep)
    assert pruned.kept_indices.dtype == torch.int64
    for kept in pruned.kept_indices:
        assert torch.all(kept[1:] > kept[:-1])  # ascending, distinct
    image_id = wrapped.model.config.image_token_id
    kept_counts = (pruned.kept_indices >= 0).sum(dim=1).tolist()
    assert kept_counts == [expected_kept_count(wrapped.model, f, keep) for f in features]
    for sample, mine in enumerate(images_per_sample(inputs, features, image_id)):
        dropped = sum(features[i].shape[0] - kept_counts[i] for i in mine)
        length = int(inputs["attention_mask"][sample].sum()) - dropped
        assert int(pruned.attention_mask[sample].sum()) == length
    with torch.no_grad():
        expected = expected_sequences(wrapped.model, inputs, pruned.kept_indices)
    for got, want in zip(real_rows(pruned.inputs_embeds, pruned.attention_mask), expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep,ratio,prompt_only_question", [(4, 0.5, False), (7, 1.0, True),
                                                             (3, 0.0, False)])
def test_selection_equals_the_reference_on_the_same_features(folders, kind, keep, ratio,
                                                             prompt_only_question):
    prompts = PROMPTS  # the last sample holds two images
    sizes = [(32, 32), (30, 60), (64, 40), (45, 45)]
    inputs = batch(folders, kind, prompts, sizes, seed=keep)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    wrapped = load(folders, kind, keep=keep, ratio=ratio)
    image_id = wrapped.model.config.image_token_id
    prompt_mask = None
    if prompt_only_question:  # the prompt vector from the tokens after the last image only
        after_image = torch.cumsum((ids == image_id).flip(1).long(), dim=1).flip(1) == 0
        prompt_mask = after_image & mask.bool()
    with torch.no_grad(), OpCalls() as ops:
        kept = wrapped.prune_inputs(**inputs, prompt_mask=prompt_mask).kept_indices
    with torch.no_grad():
        embeds = wrapped.model.get_input_embeddings()(ids)
    features = image_features(wrapped.model, inputs)
    assert len(ops.calls) == 1 and ops.calls[0][0] == len(features)  # one op call, all images
    samples = [b for b, mine in enumerate(images_per_sample(inputs, features, image_id))
               for _ in mine]
    for image, (feature, sample) in enumerate(zip(features, samples)):
        text = mask[sample].bool() & (ids[sample] != image_id)
        if prompt_mask is not None:
            text &= prompt_mask[sample]
        candidates = (~newline_flags(wrapped.model, feature)).nonzero().squeeze(1)
        want = zspaprune_ops.reference.select(feature[candidates], embeds[sample][text], keep,
                                              ratio)
        assert torch.equal(kept[image], candidates[want])




@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_per_sample_runs(folders, kind, padding_side):
    prompts = [PROMPTS[2], PROMPTS[1]] if kind == "llava" else [PROMPTS[1], PROMPTS[0]]
    sizes = [(32, 32), (48, 20), (64, 40)] if kind == "llava" else [(32, 32), (30, 70)]
    per_sample = [sizes[:2], sizes[2:]] if kind == "llava" else [sizes[:1], sizes[1:]]
    inputs = batch(folders, kind, prompts, sizes, seed=5, padding_side=padding_side)
    assert not inputs["attention_mask"].all()  # the batch is padded
    wrapped = load(folders, kind, keep=6)
    with torch.no_grad():
        pruned = wrapped.prune_inputs(**inputs)
        logits = wrapped(**inputs).logits
    new = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = new[:, inputs["input_ids"].shape[1]:]
    first = 0
    for sample, (prompt, mine) in enumerate(zip(prompts, per_sample)):
        alone = batch(folders, kind, [prompt], mine, seed=5)
        # the same pixels as in the batch: re-use the batch's images of this sample
        alone["pixel_values"] = inputs["pixel_values"][first:first + len(mine)]
        if "image_sizes" in inputs:
            alone["image_sizes"] = inputs["image_sizes"][first:first + len(mine)]
        with torch.no_grad():
            pruned_alone = wrapped.prune_inputs(**alone)
            logits_alone = wrapped(**alone).logits
        rows = slice(first, first + len(mine))
        assert torch.equal(pruned.kept_indices[rows], pruned_alone.kept_indices)
        real = pruned.attention_mask[sample].bool()
        torch.testing.assert_close(logits[sample][real], logits_alone[0], rtol=1e-5, atol=1e-5)
        new_alone = wrapped.generate(**alone, max_new_tokens=5, do_sample=False)
        assert torch.equal(new[sample], new_alone[0, alone["input_ids"].shape[1]:])
        first += len(mine)
    side = pruned.attention_mask[:, -1] if padding_side == "left" else pruned.attention_mask[:, 0]
    assert side.all()  # the shortened batch keeps the input's padding side


def test_next_newlines_are_never_candidates_and_small_images_stay_whole(folders):
    inputs = batch(folders, "llava_next", PROMPTS[:2], [(32, 32), (64, 24)], seed=8)
    model = load(folders, "llava_next").model
    features = image_features(model, inputs)
    newlines = [newline_flags(model, f) for f in features]
    base = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    for flags in newlines:  # the base tile, then AnyRes grid rows that each end in a newline
        width = int(flags[base:].nonzero()[0]) + 1
        grid = flags[base:].view(-1, width)
        assert not flags[:base].any() and grid[:, -1].all() and not grid[:, :-1].any()
    small, large = sorted(f.shape[0] for f in features)
    # keep between the two counts: the small image stays whole (newlines included); the large
    # one keeps `keep` of its content tokens and none of its newlines
    for keep in (small, large - 1):
        with torch.no_grad():
            kept = load(folders, "llava_next", keep=keep).prune_inputs(**inputs).kept_indices
        for image, feature in enumerate(features):
            row = kept[image][kept[image] >= 0]
            if feature.shape[0] <= keep:
                assert torch.equal(row, torch.arange(feature.shape[0]))
            else:
                assert not newlines[image][row].any()
                assert row.numel() == min(keep, int((~newlines[image]).sum()))


@pytest.mark.parametrize("kind", KINDS)
def test_eager_and_sdpa_attention_give_the_same_results(folders, kind):
    inputs = batch(folders, kind, PROMPTS[:2], [(32, 32), (40, 24)], seed=9)
    results = []
    for attn in ("eager", "sdpa"):
        wrapped = load(folders, kind, attn=attn, keep=5)
        assert wrapped.model.config._attn_implementation == attn
        with torch.no_grad():
            pruned = wrapped.prune_inputs(**inputs)
            logits = wrapped(**inputs).logits
        new = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False)
        results.append((pruned.kept_indices, logits, pruned.attention_mask.bool(), new))
    (kept_e, logits_e, mask, new_e), (kept_s, logits_s, _, new_s) = results
    assert torch.equal(kept_e, kept_s)
    torch.testing.assert_close(logits_e[mask], logits_s[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(new_e, new_s)


def test_reference_backend_gives_the_same_selection(folders):
    inputs = batch(folders, "llava_next", PROMPTS[:2], [(32, 32), (60, 40)], seed=10)
    with torch.no_grad():
        auto = load(folders, "llava_next", keep=9).prune_inputs(**inputs)
        ref = load(folders, "llava_next", keep=9, backend="reference").prune_inputs(**inputs)
    assert torch.equal(auto.kept_indices, ref.kept_indices)
    assert torch.equal(auto.inputs_embeds, ref.inputs_embeds)


def test_torch_compile_of_the_wrapped_forward(folders):
    inputs = batch(folders, "llava", PROMPTS[:2], [(32, 32), (40, 24)], seed=11)
    wrapped = load(folders, "llava", keep=5)
    with torch.no_grad():
        eager = wrapped(**inputs).logits
        compiled = torch.compile(wrapped, backend="aot_eager")(**inputs).logits
        # the selection itself compiles without a graph break on the op
        features = torch.stack(image_features(wrapped.model, inputs))
        embeds = wrapped.model.get_input_embeddings()(inputs["input_ids"])
        prompt_mask = inputs["input_ids"] != wrapped.model.config.image_token_id
        select = torch.compile(wrapped.selector, backend="aot_eager", fullgraph=True)
        kept = select(features, embeds, 5, 0.5, prompt_mask, None)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(kept, wrapped.selector(features, embeds, 5, 0.5, prompt_mask, None))


def test_bad_arguments_raise_clear_errors(folders):
    model = load(folders, "llava").model
    inputs = batch(folders, "llava", PROMPTS[:1], [(32, 32)])
    for kwargs, error, words in [
            (dict(keep=0), ValueError, "keep"), (dict(keep=2.0), ValueError, r"\(0, 1\]"),
            (dict(keep="8"), TypeError, "keep"),
            (dict(relevance_ratio=1.5), ValueError, "relevance_ratio"),
            (dict(relevance_ratio="half"), TypeError, "relevance_ratio"),
            (dict(backend="cuda"), ValueError, "backend"),
            (dict(prompt="question"), ValueError, r"prompt must be one of \('message', 'all'\)"),
            (dict(selector=3), TypeError, "selector must be callable"),
            (dict(selector=print, backend="reference"), ValueError, "either selector or backend")]:
        with pytest.raises(error, match=words):
            ZSPAPruneLlava(model, **kwargs)
    with pytest.raises(TypeError, match="model"):
        ZSPAPruneLlava(model.model.language_model)
    wrapped = ZSPAPruneLlava(model, keep=4)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        wrapped.prune_inputs(ids.float(), pixels)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, L\]"):
        wrapped.prune_inputs(ids[0], pixels)
    with pytest.raises(ValueError, match="attention_mask"):
        wrapped.prune_inputs(ids, pixels, attention_mask=inputs["attention_mask"][:, 1:])
    with pytest.raises(TypeError, match="prompt_mask"):
        wrapped.prune_inputs(ids, pixels, prompt_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="image tokens"):
        wrapped.prune_inputs(ids, torch.cat([pixels, pixels]))
    with pytest.raises(ValueError, match="padding_side"):
        wrapped.prune_inputs(ids, pixels, padding_side="middle")
    with pytest.raises(ValueError, match="labels"):
        wrapped(**inputs, labels=ids)
    next_inputs = batch(folders, "llava_next", PROMPTS[:1], [(32, 32)])
    with pytest.raises(ValueError, match="image_sizes"):
        load(folders, "llava_next").prune_inputs(next_inputs["input_ids"],
                                                 next_inputs["pixel_values"])


def test_tiny_builders_are_deterministic_and_the_7b_preset_has_llava_15_shapes(folders):
    from transformers import LlavaForConditionalGeneration

    from zspaprune_ops.testing.tiny_llava import LLAVA_15_7B_SIZES, build_model

    first, again, other = (build_model("llava_next", seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.image_newline"], other["model.image_newline"])
    saved = LlavaForConditionalGeneration.from_pretrained(folders["llava"]).state_dict()
    built = build_model("llava", seed=1).state_dict()
    assert all(torch.equal(saved[name], built[name]) for name in built)
    big = build_model("llava", device="meta", dtype=torch.bfloat16, **LLAVA_15_7B_SIZES)
    assert sum(p.numel() for p in big.parameters()) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    assert big.config.image_seq_length == 576 and big.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kind"):
        build_model("blip")
    with pytest.raises(ValueError, match="size"):
        build_model("llava", hidden=3)


def test_text_only_inputs_pass_through(folders):
    proc = processor(folders, "llava")
    inputs = dict(proc.tokenizer(["USER: Describe a cat. ASSISTANT:", "Hi"], return_tensors="pt",
                                 padding=True))
    wrapped = load(folders, "llava", keep=3)
    new = wrapped.generate(**inputs, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        full = wrapped.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        logits = wrapped(**inputs).logits
        reference = wrapped.model(**inputs).logits
    assert torch.equal(new, full)
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("kind", KINDS)
def test_original_positions_equal_the_full_run_with_the_pruned_tokens_masked_out(folders, kind):
    inputs = batch(folders, kind, PROMPTS[:2], [(32, 32), (40, 70)], seed=13)
    wrapped = load(folders, kind, keep=5)
    assert wrapped.positions == "compact"  # LLaVA's default
    original = ZSPAPruneLlava(wrapped.model, keep=5, relevance_ratio=wrapped.relevance_ratio,
                              positions="original")
    with torch.no_grad():
        pruned = original.prune_inputs(**inputs)
        logits = original(**inputs).logits
        compact = wrapped.prune_inputs(**inputs)
    assert torch.equal(pruned.kept_indices, compact.kept_indices)
    assert torch.equal(compact.position_ids, position_ids_from_mask(compact.attention_mask))
    features = image_features(wrapped.model, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    holes = mask.bool().clone()
    flags = []
    for kept, feature in zip(pruned.kept_indices, features):
        flag = torch.zeros(feature.shape[0], dtype=torch.bool)
        flag[kept[kept >= 0]] = True
        flags.append(flag)
    holes[ids == wrapped.model.config.image_token_id] &= torch.cat(flags)
    with torch.no_grad():
        full = wrapped.model(**inputs | {"attention_mask": holes.long()},
                             position_ids=position_ids_from_mask(mask)).logits
    for got, want in zip(real_rows(logits, pruned.attention_mask), real_rows(full, holes)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    steps = original.generate(**inputs, max_new_tokens=3, do_sample=False)
    steps = steps[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(steps[:, 0], full[:, -1].argmax(-1))  # left-padded: -1 is the last token


def test_front_door_wraps_llava_and_a_negative_index_raises(folders):
    import zspaprune_ops
    from zspaprune_ops import ZSPAPruneModel

    model = load(folders, "llava").model
    wrapped = zspaprune_ops.prune(model, keep=4, selector=lambda visual, prompt, keep, *rest:
                                  torch.full((visual.shape[0], keep), -1, dtype=torch.int64))
    assert type(wrapped) is ZSPAPruneLlava and wrapped.unwrap() is model
    assert type(ZSPAPruneModel.from_pretrained(folders["llava_next"])) is ZSPAPruneLlava
    inputs = batch(folders, "llava", PROMPTS[:1], [(32, 32)])
    with pytest.raises(RuntimeError, match="negative index"):
        wrapped.prune_inputs(**inputs)


# ------------------------------------------------------------------ the relevance prompt
REAL_TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "llava_1_5.jinja").read_text()
SYSTEM = "You are a careful assistant. Look twice."
CHAT_QUESTIONS = ("Where is the cat?", "How many objects are there, left and right?")


def chat(turns, images=(1, 2)):
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]
    for k in range(turns):
        if k:
            messages.append({"role": "assistant",
                             "content": [{"type": "text", "text": "A red square."}]})
        messages.append({"role": "user", "content": [{"type": "image"}] * images[k] +
                         [{"type": "text", "text": CHAT_QUESTIONS[k]}]})
    return messages


def chat_inputs(folders, turns, seed=3):
    proc = processor(folders, "llava")
    proc.chat_template = REAL_TEMPLATE
    text = proc.apply_chat_template(chat(turns), add_generation_prompt=True)
    count = sum((1, 2)[:turns])
    return proc, dict(proc(images=images(seed, [(32, 32)] * count), text=[text],
                           return_tensors="pt"))


def test_each_image_is_scored_against_its_own_user_message(folders):
    proc, inputs = chat_inputs(folders, turns=2)
    recorder = Recorder()
    model = load(folders, "llava").model
    wrapped = zspaprune_ops.prune(model, keep=4, processor=proc, selector=recorder)
    wrapped.prune_inputs(**inputs)
    ids = inputs["input_ids"][0].tolist()
    embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
    first, second = (question_tokens(proc.tokenizer, ids, q) for q in CHAT_QUESTIONS)
    words = proc.tokenizer.decode([ids[p] for p in second])  # blank tokens are not prompt
    assert "".join(words.split()) == "".join(CHAT_QUESTIONS[1].split())
    assert len(recorder.prompts) == 3
    for got, positions in zip(recorder.prompts, (first, second, second)):
        assert torch.equal(got, embeds[positions])
    # prompt="all": every real text token, the system prompt and the template included
    recorder.prompts.clear()
    zspaprune_ops.prune(model, keep=4, processor=proc, prompt="all",
                        selector=recorder).prune_inputs(**inputs)
    text = inputs["input_ids"][0] != model.config.image_token_id
    assert all(torch.equal(got, embeds[text]) for got in recorder.prompts)
    # an explicit prompt_mask wins over both
    recorder.prompts.clear()
    mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    mask[0, first] = True
    wrapped.prune_inputs(**inputs, prompt_mask=mask)
    assert all(torch.equal(got, embeds[first]) for got in recorder.prompts)


def test_a_later_turn_changes_no_earlier_selection(folders):
    proc, one_turn = chat_inputs(folders, turns=1)
    _, two_turns = chat_inputs(folders, turns=2)  # the same first image (same seed), one more turn
    assert torch.equal(one_turn["pixel_values"][0], two_turns["pixel_values"][0])
    wrapped = zspaprune_ops.prune(load(folders, "llava").model, keep=4, processor=proc)
    with torch.no_grad():
        alone = wrapped.prune_inputs(**one_turn).kept_indices
        later = wrapped.prune_inputs(**two_turns).kept_indices
    assert torch.equal(alone[0], later[0])
    with torch.no_grad():  # the whole transcript as the prompt: the second turn moves the first
        everything = zspaprune_ops.prune(wrapped.model, keep=4, relevance_ratio=1.0,
                                         processor=proc, prompt="all")
        moved = [everything.prune_inputs(**x).kept_indices[0] for x in (one_turn, two_turns)]
    assert not torch.equal(*moved)


def test_from_pretrained_finds_the_chat_template_and_warns_without_one(folders):
    wrapped = ZSPAPruneLlava.from_pretrained(folders["llava"], keep=4)
    assert wrapped.layout is not None and wrapped.prompt == "message"
    bare = ZSPAPruneLlava(wrapped.model, keep=4)
    inputs = batch(folders, "llava", PROMPTS[:1], [(32, 32)])
    with pytest.warns(UserWarning, match="no tokenizer with a chat template"):
        bare.prune_inputs(**inputs)
