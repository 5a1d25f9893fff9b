"""The shapes world: deterministic scenes whose pixels and answers agree; the training script
runs and saves a model that loads and answers."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from zspaprune_ops.world import scenes  # noqa: E402
from zspaprune_ops.world.model import (CHAT_TEMPLATE, WORDS, build_model,  # noqa: E402
                                        build_processor, chat_prompt)

REAL_LLAVA_TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "llava_1_5.jinja"
                       ).read_text()

def test_samples_are_deterministic_and_splits_differ():
    first = scenes.sample("test", 3)
    again = scenes.sample(2, 3)  # the test split's seed
    assert first.image.tobytes() == again.image.tobytes()
    assert (first.question, first.answer, first.things) == (again.question, again.answer,
                                                            again.things)
    assert scenes.sample("train", 3).image.tobytes() != first.image.tobytes()
    with pytest.raises(ValueError, match="split must be one of"):
        scenes.sample("dev", 0)


def test_answers_and_pixels_match_the_scene():
    kinds = set()
    for index in range(60):
        s = scenes.sample("val", index)
        kinds.add(s.kind)
        shapes = {t.shape: t.colour for t in s.things}
        assert len(shapes) == len(s.things) == len({t.colour for t in s.things}) in (2, 3)
        assert s.answer in scenes.ANSWERS[s.kind]
        named = s.question.rstrip("?").split()[-1]
        if s.kind == "color":
            assert shapes[named] == s.answer
        elif s.kind == "shape":
            assert shapes[s.answer] == named
        else:
            assert (named in shapes) == (s.answer == "yes")
        for thing in s.things:  # the middle of the lower half is inside every shape
            left, top, right, bottom = thing.box
            pixel = s.image.getpixel(((left + right) // 2, (top + 2 * bottom) // 3))
            assert pixel == scenes.COLOURS[thing.colour]
    assert kinds == set(scenes.KINDS)


def test_patch_labels_name_the_thing_under_each_patch():
    s = scenes.sample("train", 5)
    shapes, colours = scenes.patch_labels(s.things)
    side = scenes.IMAGE_SIZE // scenes.PATCH_SIZE
    assert len(shapes) == len(colours) == side * side
    for thing in s.things:
        left, top, right, bottom = thing.box
        patch = ((top + 2 * bottom) // 3 // scenes.PATCH_SIZE) * side + (
            (left + right) // 2 // scenes.PATCH_SIZE)
        assert shapes[patch] == 1 + scenes.SHAPES.index(thing.shape)
        assert colours[patch] == 1 + list(scenes.COLOURS).index(thing.colour)
    assert 0 < sum(label > 0 for label in shapes) < side * side // 2


def test_every_question_and_answer_is_known_words():
    tokenizer = build_processor().tokenizer
    unknown = tokenizer.convert_tokens_to_ids("<unk>")
    for index in range(30):
        s = scenes.sample("train", index)
        ids = tokenizer(f"USER: {s.question} ASSISTANT: {s.answer}")["input_ids"]
        assert unknown not in ids
        assert len(tokenizer(s.answer)["input_ids"]) == 1
    assert len(set(WORDS)) == len(WORDS)


def test_training_script_runs_a_few_steps_and_saves_a_loadable_model(tmp_path, capsys):
    from zspaprune_ops.checkpoint import load
    from zspaprune_ops.world import train

    train.main(["--vision-steps", "1", "--text-steps", "1", "--align-steps", "1", "--steps", "2",
                "--batch", "2", "--turns", "3", "--log-every", "1", "--threads", "1",
                "--out", str(tmp_path)])  # a step of each stage, two of instruction tuning
    out = capsys.readouterr().out
    for line in ("vision step 1/1 loss patch", "text step 1/1 loss text",
                 "align step 1/1 loss caption", "\nstep 2/2 loss answer",
                 "after align steps: object patches whose nearest word embedding"):
        assert line in out, out
    assert f"saved to {tmp_path}" in out
    model, processor = load(str(tmp_path), torch.device("cpu"), torch.float32)
    assert model.config.image_seq_length == 256
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {
        torch.float16}
    batch = processor(images=[scenes.sample("val", 0).image], return_tensors="pt",
                      text=[chat_prompt(scenes.sample("val", 0).question)])
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[0] == 1
    assert processor.chat_template == REAL_LLAVA_TEMPLATE  # prompt="message" finds the question


def test_frozen_vision_instruction_tuning_moves_the_language_model_only(tmp_path):
    from zspaprune_ops.world import train

    recipe = train.Recipe(vision_steps=0, steps=2, batch_size=2, turns=2, frozen_vision=True)
    model, _, _ = train.train(tmp_path, recipe, log_every=2)
    fresh = build_model(recipe.seed).half().float()  # saved in fp16: compare what was saved
    before, after = dict(fresh.named_parameters()), dict(model.named_parameters())
    vision = [n for n in after if "vision_tower" in n or "multi_modal_projector" in n]
    language = [n for n in after if n not in vision]
    assert vision and language
    assert all(torch.equal(after[n], before[n]) for n in vision)
    assert any(not torch.equal(after[n], before[n]) for n in language)


def test_the_world_template_is_llava_1_5s_and_renders_chat_prompt():
    processor = build_processor()
    assert CHAT_TEMPLATE == REAL_LLAVA_TEMPLATE
    conversation = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "Is there a cross?"}]}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        chat_prompt("Is there a cross?"))


def test_cluttered_scenes_are_busier_and_every_question_names_one_object():
    sizes, counts = [], []
    for index in range(60):
        s = scenes.sample("cluttered", index)
        counts.append(len(s.things))
        sizes += [t.box[2] - t.box[0] for t in s.things]
        assert len({t.colour for t in s.things}) == len(s.things)
        named = s.question.rstrip("?").split()[-1]
        matches = [t for t in s.things if named in (t.shape, t.colour)]
        assert s.kind in ("color", "shape") and len(matches) == 1, s.question
        assert s.answer == (matches[0].colour if s.kind == "color" else matches[0].shape)
        colours = scenes.patch_labels(s.things)[1]
        patches = scenes.named_patches(s.things, s.question, colours)
        assert 0 < sum(patches) <= 16  # at most 44 px: within 4x4 patches
    assert set(counts) == {4, 5} and 30 <= min(sizes) and max(sizes) <= 44
    assert any(len({t.shape for t in scenes.sample("cluttered", i).things}) < 4
               for i in range(10))  # shapes repeat
    assert scenes.sample("cluttered", 0).image.tobytes() != scenes.sample(12, 0).image.tobytes()
    for _, question, _ in scenes.all_questions(scenes.sample("cluttered", 1).things):
        word = question.rstrip("?").split()[-1]
        if question.startswith("What color"):  # only about a shape the scene holds once
            assert sum(t.shape == word for t in scenes.sample("cluttered", 1).things) == 1


def test_captions_list_the_objects_in_reading_order():
    s = scenes.sample("test", 0)
    words = scenes.caption(s.things).split()
    assert len(words) == 3 * len(s.things) and words[::3] == ["a"] * len(s.things)
    ordered = sorted(s.things, key=lambda t: (t.box[1] // scenes.PATCH_SIZE, t.box[0]))
    assert words[1::3] == [t.colour for t in ordered] and words[2::3] == [t.shape for t in ordered]


def test_text_and_caption_stages_label_every_assistant_token():
    from zspaprune_ops.world import train

    processor = build_processor()
    batch = scenes.samples("train", 2)
    texts = [train.text_conversation(s, 3, f"t/{i}") for i, s in enumerate(batch)]
    inputs = train.batch_inputs(processor, batch, texts=texts)
    assert "pixel_values" not in inputs
    tokens = processor.tokenizer.convert_ids_to_tokens
    for i, (sample, text, labels) in enumerate(zip(batch, texts, inputs["labels"])):
        caption = scenes.caption(sample.things).split()
        answers = [a for _, a in train.dialogue(sample, 3, f"t/{i}")]
        expected = [*caption, "</s>", *[w for a in answers for w in (a, "</s>")]]
        assert tokens(labels[labels != -100].tolist()) == expected
        assert text.startswith(f"USER: {' '.join(caption)}\n ASSISTANT: ")
    inputs = train.batch_inputs(processor, batch, texts=[train.caption_conversation(s)
                                                         for s in batch])
    assert inputs["pixel_values"].shape[0] == 2
    for sample, labels in zip(batch, inputs["labels"]):
        assert tokens(labels[labels != -100].tolist()) == [
            *scenes.caption(sample.things).split(), "</s>"]


def test_training_labels_are_every_answer_and_end_of_turn():
    from zspaprune_ops.world import train

    processor = build_processor()
    batch = scenes.samples("train", 3)
    inputs = train.batch_inputs(processor, batch, turns=4, seed="t")
    for sample, ids, labels in zip(batch, inputs["input_ids"], inputs["labels"]):
        words = processor.tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())
        answers, ends = words[::2], words[1::2]
        assert len(answers) == 4 and ends == ["</s>"] * 4
        assert answers[0] == sample.answer  # the sample's own question comes first
        truth = {q.replace(" ", ""): a for _, q, a in scenes.all_questions(sample.things)}
        tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
        turns = "".join(t for t in tokens if t not in ("<image>", "<pad>")).split("USER:")[1:]
        asked = [turn.split("ASSISTANT:") for turn in turns]
        assert [truth[q] for q, _ in asked] == [a.removesuffix("</s>") for _, a in asked]
        assert len(set(q for q, _ in asked)) == 4 and [a for _, a in asked] == [
            f"{a}</s>" for a in answers]


def test_grounding_loss_rewards_attention_on_the_named_object():
    """All of head 0's attention on the named object's patches costs nothing; attention spread
    over the image costs -log(the object's share of the patches); other heads do not count."""
    import math

    from zspaprune_ops.world import train
    from zspaprune_ops.world.model import build_model

    processor, image_token = build_processor(), build_model().config.image_token_id
    eos = processor.tokenizer.eos_token_id
    batch = scenes.samples("train", 2)
    inputs = train.batch_inputs(processor, batch, turns=4, seed="g")
    ids, labels = inputs["input_ids"], inputs["labels"]
    shape = (2, 2, ids.shape[1], ids.shape[1])  # [B, H, T, T]
    on_object, spread = torch.zeros(shape), torch.zeros(shape)
    expected = []
    for b, sample in enumerate(batch):
        visual = (ids[b] == image_token).nonzero().squeeze(1)
        shapes = torch.tensor(scenes.patch_labels(sample.things)[0])
        answers = ((labels[b] != -100) & (labels[b] != eos)).nonzero().squeeze(1)
        for position, (question, answer) in zip(answers - 1, train.dialogue(sample, 4, f"g/{b}")):
            assert processor.tokenizer.convert_ids_to_tokens(int(ids[b, position])) == ":"
            named = question.rstrip("?").split()[-1]
            things = [t for t in sample.things if named in (t.shape, t.colour)]
            spread[b, 0, position, visual] = 1 / len(visual)
            on_object[b, 1, position, visual] = 1 / len(visual)  # head 1: ignored
            if things:
                target = visual[shapes == 1 + scenes.SHAPES.index(things[0].shape)]
                on_object[b, 0, position, target] = 1 / len(target)
                expected.append(-math.log(len(target) / len(visual)))
            else:
                assert answer == "no"
    assert train.grounding_loss(on_object, inputs, batch, 4, "g", image_token, eos) < 1e-5
    assert train.grounding_loss(spread, inputs, batch, 4, "g", image_token, eos).item() == (
        pytest.approx(sum(expected) / len(expected), rel=1e-4))


def test_patch_heads_learn_shapes_from_object_means():
    """The patch heads' loss: per-patch colour, per-object-patch shape, per-object shape from
    the mean of its patches. Features that are one-hot labels can drive it near zero."""
    from zspaprune_ops.world import train

    batch = scenes.samples("train", 3)
    labels = [scenes.patch_labels(s.things) for s in batch]
    shapes = torch.tensor([shape for shape, _ in labels])
    colours = torch.tensor([colour for _, colour in labels])
    features = torch.cat([torch.nn.functional.one_hot(shapes, 5),
                          torch.nn.functional.one_hot(colours, 6)], -1).float() * 50
    heads = train.PatchHeads(11)
    with torch.no_grad():
        for head in (heads.shape, heads.colour, heads.object_shape):
            head.weight.zero_()
            head.bias.zero_()
        heads.shape.weight[:, :5] = torch.eye(5)
        heads.colour.weight[:, 5:] = torch.eye(6)
        heads.object_shape.weight[:, 1:5] = torch.eye(4)
    assert heads.loss(features.flatten(0, 1), batch) < 1e-3
    with torch.no_grad():
        heads.object_shape.weight[:, 1:5] = torch.eye(4)[[1, 2, 3, 0]]  # every object's shape wrong
    assert heads.loss(features.flatten(0, 1), batch) > 10


def test_prompt_message_is_the_question_in_the_world_prompt():
    """The world's tokenizer decodes a prompt as the template wrote it, so ``prompt="message"``
    finds exactly the question's tokens (not USER, ASSISTANT or the colons)."""
    from zspaprune_ops.checkpoint import prompt_text
    from zspaprune_ops.prompt import ChatLayout, prompt_positions

    processor = build_processor()
    tokenizer = processor.tokenizer
    image = tokenizer.convert_tokens_to_ids("<image>")
    layout = ChatLayout.of(processor)
    for index in range(6):
        question = scenes.sample("cluttered" if index % 2 else "test", index).question
        ids = processor(images=scenes.sample("test", 0).image, text=prompt_text(
            processor, question), return_tensors="pt")["input_ids"][0].tolist()
        assert ids.count(image) == 256
        (positions,) = prompt_positions(ids, [ids.index(image)], [image], layout, "message")
        assert [ids[p] for p in positions] == tokenizer(question)["input_ids"]
        (everything,) = prompt_positions(ids, [ids.index(image)], [image], layout, "all")
        assert len(everything) == len(positions) + 4  # USER : ... ASSISTANT :
