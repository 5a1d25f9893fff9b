"""The shapes world: deterministic scenes whose pixels and answers agree; the training script
runs and saves a model that loads and answers."""
import pytest
import torch

pytest.importorskip("transformers")
from zspaprune_ops.world import scenes  # noqa: E402
from zspaprune_ops.world.model import WORDS, build_processor, chat_prompt  # noqa: E402


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
    from zspaprune_ops.demo import load
    from zspaprune_ops.world import train

    train.main(["--steps", "2", "--batch", "2", "--turns", "3", "--thin-steps", "1",
                "--log-every", "1", "--out", str(tmp_path)])  # a thinned step, then a full one
    out = capsys.readouterr().out
    assert "step 2/2 loss" in out and f"saved to {tmp_path}" in out
    model, processor = load(str(tmp_path), torch.device("cpu"), torch.float32)
    assert model.config.image_seq_length == 256
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {
        torch.float16}
    batch = processor(images=[scenes.sample("val", 0).image], return_tensors="pt",
                      text=[chat_prompt(scenes.sample("val", 0).question)])
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[0] == 1


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


def test_thinned_training_keeps_objects_and_text():
    """With no background kept, the thinned sequence is the text plus the object patches."""
    from zspaprune_ops.world import train
    from zspaprune_ops.world.model import build_model

    processor, model = build_processor(), build_model()
    batch = scenes.samples("train", 2)
    inputs = train.batch_inputs(processor, batch, turns=2)
    seen = []
    hook = model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["attention_mask"].sum(1)),
        with_kwargs=True)
    loss = train.thinned_loss(model, inputs, batch, 0.0, torch.Generator())
    hook.remove()
    text = (inputs["input_ids"] != model.config.image_token_id) & (inputs["attention_mask"] == 1)
    objects = [sum(label > 0 for label in scenes.patch_labels(s.things)[0]) for s in batch]
    assert seen[0].tolist() == [int(t) + o for t, o in zip(text.sum(1), objects)]
    assert torch.isfinite(loss)
