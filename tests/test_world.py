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
    from zspaprune_ops.checkpoint import load
    from zspaprune_ops.world import train

    train.main(["--vision-steps", "1", "--steps", "2", "--batch", "2", "--turns", "3",
                "--log-every", "1", "--out", str(tmp_path)])  # a vision step, then two full ones
    out = capsys.readouterr().out
    assert "vision step 1/1 loss" in out and "step 2/2 loss" in out
    assert f"saved to {tmp_path}" in out
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
