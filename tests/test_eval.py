"""`zspaprune eval`: the selection baselines, the shipped model's accuracy, every method and
budget in one run, the JSONL path, and clear errors for bad input."""
import json

import pytest
import torch

pytest.importorskip("transformers")
import zspaprune_ops  # noqa: E402
from zspaprune_ops.cli import main  # noqa: E402
from zspaprune_ops.eval import data, run  # noqa: E402
from zspaprune_ops.eval.methods import baseline_selector, random_pick, uniform_pick  # noqa: E402
from zspaprune_ops.testing.tiny_llava import build_model  # noqa: E402
from zspaprune_ops.world import scenes  # noqa: E402

SHIPPED_TEST_ACCURACY = 0.892
"""The shipped model's unpruned accuracy on 500 test-split questions, as README.md reports."""
MARGIN = 0.06
"""Allowed shortfall on 300 fresh questions (seed 1234 gave 0.900 when it was trained; the 95%
interval half-width there is about 0.035). A model at the old recipe's 42% fails by far."""


def test_uniform_pick_spreads_over_the_grid():
    everything = torch.ones(256, dtype=torch.bool)
    for keep in (1, 13, 28, 64, 128, 255, 256):
        picks = uniform_pick(everything, keep)
        assert len(picks) == keep and torch.equal(picks, picks.unique())  # distinct, ascending
    rows, cols = uniform_pick(everything, 64) // 16, uniform_pick(everything, 64) % 16
    for half in (rows < 8, rows >= 8, cols < 8, cols >= 8):
        assert int(half.sum()) == 32  # each half of the image gets half the tokens
    some = torch.zeros(20, dtype=torch.bool)
    some[[1, 4, 6, 9, 15]] = True
    assert uniform_pick(some, 2).tolist() == [4, 9]  # the middles of two halves of 5 candidates
    with pytest.raises(ValueError, match=r"keep must be in \[1, 5\]"):
        uniform_pick(some, 6)


def test_random_pick_is_seeded_and_keeps_candidates_only():
    mask = torch.arange(50) % 3 == 0
    first = random_pick(mask, 7, torch.Generator().manual_seed(1))
    assert torch.equal(first, random_pick(mask, 7, torch.Generator().manual_seed(1)))
    assert bool(mask[first].all()) and torch.equal(first, first.unique())
    assert random_pick(mask, 17, torch.Generator()).tolist() == mask.nonzero().squeeze(1).tolist()


def test_random_selection_keeping_every_token_is_the_unpruned_model():
    model = build_model("llava", seed=0)  # 16 visual tokens
    image_token = model.config.image_token_id
    input_ids = torch.tensor([[1, 7, *[image_token] * 16, 9, 11]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unpruned = model(input_ids=input_ids, pixel_values=pixels).logits
        pruned = zspaprune_ops.prune(model, 16, selector=baseline_selector(
            "random", torch.Generator()))(input_ids, pixels).logits
        fewer = zspaprune_ops.prune(model, 8, selector=baseline_selector(
            "random", torch.Generator()))(input_ids, pixels).logits
    torch.testing.assert_close(pruned, unpruned)
    assert fewer.shape[1] == unpruned.shape[1] - 8


def test_wilson_interval():
    low, high = run.wilson_interval(80, 100)
    assert (round(low, 4), round(high, 4)) == (0.7112, 0.8666)
    assert run.wilson_interval(0, 0) == (0.0, 1.0)


def test_shipped_model_accuracy_on_fresh_questions():
    """A seed not used in training (train 0, val 1, test 2): unpruned accuracy holds up."""
    from zspaprune_ops.checkpoint import load

    model, processor = load(None, torch.device("cpu"), torch.float32)
    questions = data.world_questions(1234, 300)
    _, unpruned = run.evaluate(model, processor, questions, [], [], 3, torch.device("cpu"))
    accuracy = unpruned.correct / unpruned.asked
    assert unpruned.asked == 300 and accuracy >= SHIPPED_TEST_ACCURACY - MARGIN, accuracy


def eval_rows(tmp_path, capsys, *argv):
    out_json, plot = tmp_path / "rows.json", tmp_path / "plot.png"
    main(["eval", *argv, "--out", str(out_json), "--plot", str(plot)])
    rows = json.loads(out_json.read_text())
    assert plot.stat().st_size > 0
    return rows, capsys.readouterr().out


def test_eval_runs_every_method_and_budget(tmp_path, capsys):
    rows, out = eval_rows(tmp_path, capsys, "--questions", "2")
    assert rows[0]["impl"] == "unpruned" and rows[0]["keep"] == 256
    methods = ["ratio 0 (DivPrune)", "ratio 0.25", "ratio 0.5", "ratio 0.75",
               "ratio 1 (relevance only)", "random", "uniform"]
    expected = {(m, b) for m in methods for b in (0.5, 0.25, 0.1111, 0.05)}
    assert {(r["method"], r["shape"]["budget"]) for r in rows[1:]} == expected
    assert {r["keep"] for r in rows[1:]} == {128, 64, 28, 13}
    for row in rows:
        assert row["bench"] == "accuracy" and row["shape"]["questions"] == 2
        assert 0 <= row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] <= 1
        assert row["correct"] == round(row["accuracy"] * 2) and row["device"] == "cpu"
        assert len(row["right"]) == 2 and row["right"].count("1") == row["correct"]
    for method in methods:
        assert method in out



def test_eval_budgets_are_token_counts_or_shares(tmp_path, capsys):
    """``--budgets 64`` keeps 64 tokens per image (as ``prune(keep=64)``), the same as the share
    0.25 of 256; a count above the image's tokens keeps it whole."""
    rows, out = eval_rows(tmp_path, capsys, "--questions", "2", "--methods", "uniform",
                          "--budgets", "64", "0.25", "300")
    by_budget = {r["shape"]["budget"]: r for r in rows[1:]}
    assert {b: r["keep"] for b, r in by_budget.items()} == {64: 64, 0.25: 64, 300: 256}
    assert by_budget[64]["right"] == by_budget[0.25]["right"]  # same tokens, same answers
    assert by_budget[300]["right"] == rows[0]["right"]
    assert "64 tokens" in out and "25% (64 tokens)" in out and "6400%" not in out

def write_jsonl(tmp_path, count):
    """The first ``count`` test-split questions as images and a JSONL file."""
    lines = []
    for index in range(count):
        sample = scenes.sample("test", index)
        sample.image.save(tmp_path / f"scene{index}.png")
        lines.append(json.dumps({"image": f"scene{index}.png", "question": sample.question,
                                 "answers": [sample.answer.upper() + "."]}))
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_jsonl_dataset_gives_the_same_answers_as_the_world(tmp_path, capsys):
    path = write_jsonl(tmp_path, 3)
    argv = ["--methods", "uniform", "zspaprune", "uniform", "--ratios", "0.5", "--budgets", "0.1"]
    from_file, _ = eval_rows(tmp_path, capsys, "--data", str(path), *argv)
    from_world, _ = eval_rows(tmp_path, capsys, "--questions", "3", *argv)
    assert from_file[0]["shape"]["data"] == "questions.jsonl"
    assert [r["method"] for r in from_file] == ["unpruned", "ratio 0.5", "uniform"]  # each once
    assert all(r["shape"]["questions"] == 3 and r["correct"] <= 3 for r in from_file)
    for a, b in zip(from_file, from_world, strict=True):
        assert (a["method"], a["correct"], a["agree"]) == (b["method"], b["correct"], b["agree"])


@pytest.mark.parametrize("line, message", [
    ('{"image": "missing.png", "question": "Q?", "answers": ["a"]}',
     "line 2: image {folder}/missing.png: not found"),
    ('{"image": "scene0.png", "question": "Q?", "answers": ["a"]', "line 2: not valid JSON"),
    ('["scene0.png", "Q?"]', "line 2: expected a JSON object, got list"),
    ('{"image": "scene0.png", "answers": ["a"]}', "line 2: 'question' must be a non-empty"),
    ('{"image": "scene0.png", "question": "Q?", "answers": []}', "line 2: 'answers' must be"),
    ('{"image": "questions.jsonl", "question": "Q?", "answer": "a"}',
     "line 2: image {folder}/questions.jsonl: not an image Pillow reads"),
])
def test_bad_dataset_lines_are_usage_errors_naming_the_line(tmp_path, capsys, line, message):
    path = write_jsonl(tmp_path, 1)
    path.write_text(path.read_text().strip() + "\n" + line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--data", str(path), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    errors = [text for text in err.splitlines() if "error:" in text]
    assert exit_info.value.code == 2 and len(errors) == 1, err
    assert f"--data {path} " + message.format(folder=tmp_path) in errors[0]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "topk"], "argument --methods: invalid choice: 'topk'"),
    (["--budgets", "0"], "argument --budgets: must be a token count (an integer >= 1) or a "
                         "share of each image's tokens (a number in (0, 1]), got '0'"),
    (["--ratios", "2"], "argument --ratios: must be a number in [0, 1]"),
    (["--split", "dev"], "--split split must be one of ['cluttered', 'cluttered-train', "
                          "'cluttered-val', 'test', 'train', 'val']"),
    (["--data", "/no/such.jsonl"], "argument --data: /no/such.jsonl does not exist"),
    (["--plot", "plot.svg"], "--plot plot.svg: give a .png file name"),
])
def test_bad_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: zspaprune eval ")
    errors = [text for text in err.splitlines() if "error:" in text]
    assert len(errors) == 1 and message in errors[0], err
