"""The kernel benchmark harness (bench/): the baselines follow the rule, the benchmark inputs are
exact, every impl is checked equal to the reference before it is timed, results render.

The pytest-benchmark tests time each impl on a tiny CPU shape (``fused`` only where the triton
backend exists and, on CPU, TRITON_INTERPRET=1 is set; otherwise skipped with the reason).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import baselines  # noqa: E402
import bench_select  # noqa: E402
import results  # noqa: E402
from literal import replay  # noqa: E402
from test_reference import random_case  # noqa: E402
from zspaprune_ops.reference.naive import select_batched  # noqa: E402

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TINY = bench_select.Shape(B=2, N=48, D=32, T=8, keep=4, dtype="float16", masks=True)
LIMITS = bench_select.build_parser().parse_args(["--compile-max-keep", "8"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed,N,keep,ratio", [(0, 40, 6, 0.5), (1, 97, 20, 0.0),
                                               (2, 63, 17, 1.0), (3, 150, 33, 0.3)])
def test_divprune_loop_follows_the_rule(seed, N, keep, ratio, dtype):
    visual, prompt, prompt_mask, visual_mask = random_case(
        seed, 3, N, 24, 7, dtype, visual_padding=True, prompt_padding=True, duplicates=True,
        zeros=True)
    visual[1, 2] = float("nan")  # unscorable tokens: taken only after every scorable one
    visual[2, 5] = float("inf")
    keep = min(keep, int(visual_mask.sum(1).min()))
    kept = baselines.divprune_loop(visual, prompt, keep, ratio, prompt_mask, visual_mask)
    assert kept.dtype == torch.int64 and kept.shape == (3, keep)
    for b in range(3):
        replay(visual[b], prompt[b], keep, ratio, kept[b], prompt_mask[b], visual_mask[b])


@pytest.mark.parametrize("name", sorted(bench_select.PRESETS["cpu-smoke"]))
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_divprune_loop_equals_reference_on_bench_inputs(name, ratio):
    shape = bench_select.replace(bench_select.PRESETS["cpu-smoke"][name], ratio=ratio)
    args = bench_select.make_inputs(shape, CPU, seed=7).args(shape)
    assert torch.equal(baselines.divprune_loop(*args), select_batched(*args))


@pytest.mark.parametrize("D", [16, 80, 256])
def test_bench_inputs_make_float32_math_exact(D):
    shape = bench_select.Shape(B=3, N=70, D=D, T=8, keep=10, dtype="bfloat16", masks=True)
    inputs = bench_select.make_inputs(shape, CPU, seed=D)
    for b in range(3):
        real = inputs.visual[b, inputs.visual_mask[b]].float()
        v32 = real / real.norm(dim=1, keepdim=True)
        v64 = real.double() / real.double().norm(dim=1, keepdim=True)
        assert torch.equal((v32 @ v32.T).double(), v64 @ v64.T)  # cosines: exact in any order
        prompt = inputs.prompt[b, inputs.prompt_mask[b]].float()
        count = prompt.shape[0]
        assert count & (count - 1) == 0 and torch.equal(prompt, prompt[:1].expand_as(prompt))
    assert not inputs.visual_mask.all() and inputs.visual_mask.sum(1).min() >= shape.keep
    assert not inputs.prompt_mask.all() and inputs.prompt_mask.any(1).all()


def test_floor_bytes_count_features_and_masks():
    shape = bench_select.Shape(B=4, N=576, D=4096, T=64, keep=64, dtype="bfloat16", masks=True)
    assert bench_select.floor_bytes(shape) == 4 * (576 + 64) * 4096 * 2 + 4 * (576 + 64)
    fields = results.floor_fields(bench_select.floor_bytes(shape), (3.35e12, "spec"))
    assert fields["floor_us"] == pytest.approx(4 * 640 * 8193 / 3.35e12 * 1e6)
    assert results.floor_fields(100, results.hbm_bandwidth(CPU))["floor_us"] is None


def test_impls_beyond_their_bounds_are_skipped_with_the_reason():
    inputs = bench_select.make_inputs(TINY, CPU)
    small = bench_select.build_parser().parse_args(
        ["--compile-max-keep", "2", "--divprune-max-bytes", "1000"])
    for impl, words in [("reference_compiled", "keep > 2"), ("divprune_loop", "N×N scratch")]:
        fn, reason = bench_select.build(impl, TINY, inputs, small)
        assert fn is None and words in reason


def _raise(*args):
    raise RuntimeError("kernel crashed")


@pytest.mark.parametrize("broken,reason", [
    (lambda *args: select_batched(*args).flip(1), "output differs from the reference: not timed"),
    (_raise, "failed: RuntimeError: kernel crashed")])
def test_a_wrong_or_failing_impl_is_reported_and_not_timed(broken, reason, monkeypatch, capsys):
    monkeypatch.setattr(baselines, "divprune_loop", broken)
    status = bench_select.main(["--shapes", "B=2,N=40,D=16,T=4,keep=5,dtype=float32",
                                "--impls", "reference,divprune_loop", "--dry-run"])
    out = capsys.readouterr()
    assert status == 1 and "WRONG OR FAILED, NOT TIMED: B=2,N=40" in out.err
    assert "| skipped (1) |" in out.out and f"1. skipped: {reason}" in out.out


def test_rows_go_to_a_fresh_local_file_unless_out_names_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    argv = ["--shapes", "B=1,N=20,D=8,T=4,keep=3,dtype=float32", "--impls", "reference",
            "--repeat", "1"]
    assert bench_select.main(argv) == 0
    (fresh,) = tmp_path.rglob("*.json")
    assert fresh.parent == tmp_path / "local" and fresh.name.startswith("cpu-")
    assert f"rows in {fresh}" in capsys.readouterr().out
    header = results.render_table(json.loads(fresh.read_text()))[0]
    assert header == "| shape | reference µs |"  # units in the printed table
    out = tmp_path / "chosen.json"
    for run in (1, 2):  # --out appends: a run cut short keeps what it measured
        assert bench_select.main([*argv, "--out", str(out)]) == 0
        assert len(json.loads(out.read_text())) == run
    assert len(list(tmp_path.rglob("*.json"))) == 2


def test_committed_results_render():
    committed = sorted(results.RESULTS_DIR.glob("*.json"))
    rows = results.load(committed)
    assert committed and rows
    text = results.render(rows)
    for row in rows:
        assert f"## {row['bench']} on {row['device']}" in text
    assert "| shape | " in text and " µs |" in text


def test_render_shows_speedups_floor_multiples_and_skips():
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6", "commit": "c",
           "date": "d", "bench": "select", "shape": {"B": 1, "N": 576}, "extra_peak_bytes": None,
           **results.floor_fields(1_000_000, (1e12, "spec"))}  # floor: 1 µs
    rows = [{**env, "impl": "fused", "median_us": 10.0, "extra_peak_bytes": 2**20},
            {**env, "impl": "reference", "median_us": 300.0},
            {**env, "impl": "divprune_loop", "median_us": None, "skipped": "too big"}]
    text = results.render(rows)
    assert "| B=1, N=576 | 1.0 | 10.0 (10× floor) | 300.0 (300× floor) | skipped (1) | 30.00× |  |" \
        in text
    assert "1. skipped: too big" in text and "| B=1, N=576 | 1.0 | n/a | n/a |" in text
    assert "No GPU results yet" not in text
    cpu = [{**row, "device": "cpu", "floor_us": None} for row in rows]
    assert "No GPU results yet" in results.render(cpu)
    json.dumps(rows)  # rows stay plain JSON


@pytest.mark.parametrize("impl", bench_select.IMPLS)
def test_benchmark_select(impl, benchmark):
    inputs = bench_select.make_inputs(TINY, CPU)
    fn, reason = bench_select.build(impl, TINY, inputs, LIMITS)
    if fn is None:
        pytest.skip(reason)
    if impl not in bench_select.FLOORS:  # never time a wrong impl
        assert torch.equal(fn(), select_batched(*inputs.args(TINY)))
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


def test_shapes_by_name_glob_and_spec():
    shapes = bench_select.parse_shapes("llava7b-k64-b*,B=3,N=30,masks=1,dtype=float16")
    assert list(shapes)[:2] == ["llava7b-k64-b8-masks", "llava7b-k64-b32"]
    spec = shapes["B=3,N=30,masks=1,dtype=float16"]
    assert (spec.B, spec.N, spec.D, spec.keep, spec.masks, spec.dtype) == (3, 30, 4096, 64, True,
                                                                          "float16")
    for bad in ["nosuch", "B=1,Q=2", "dtype=int8"]:
        with pytest.raises(ValueError, match="--shapes"):
            bench_select.parse_shapes(bad)


def test_render_compares_graph_replays_with_the_model():
    env = {"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "commit": "c",
           "date": "d", "bench": "select", "shape": {"B": 1, "N": 576}, "extra_peak_bytes": None,
           **results.floor_fields(1_000_000, (1e12, "spec"))}
    rows = [{**env, "impl": "fused", "median_us": 50.0, "predicted_us": 40.0},
            {**env, "impl": "fused_graph", "median_us": 44.0, "predicted_us": 40.0},
            {**env, "impl": "reference", "median_us": 3000.0}]
    header, _, line = results.render_table(rows)[:3]
    assert header.endswith("| model µs | graph / model |")
    assert line.endswith("| 60.00× | 40.0 | 1.10× |")


def test_fused_graph_needs_a_gpu_and_the_model_predicts_known_gpus(monkeypatch):
    shape = bench_select.ALL_SHAPES["llava7b-k64-t650-masks"]
    assert shape.T == 650 and shape.masks and shape.B == 1  # the LLaVA path's prompt
    inputs = bench_select.make_inputs(bench_select._spec_shape({"N": "20", "D": "8", "keep": "3"}),
                                      torch.device("cpu"))
    fn, reason = bench_select.build("fused_graph", shape, inputs, None)
    assert fn is None and "GPU" in reason
    monkeypatch.setattr(results, "device_name", lambda device: "NVIDIA H200")
    predicted = bench_select._prediction(shape, torch.device("cuda"))["predicted_us"]
    assert 10 < predicted < 1000
    monkeypatch.setattr(results, "device_name", lambda device: "NVIDIA A10G")
    assert bench_select._prediction(shape, torch.device("cuda")) == {}


def test_render_accuracy_per_data_set_with_paired_differences_and_coverage():
    """Eval runs (two data sets, two models on one) render as a table each, with its paired
    differences against DivPrune; coverage rows render per data set with the message - all
    difference."""
    env = {"device": "cpu", "torch": "t", "triton": "x", "commit": "c", "date": "d"}

    def row(data, method, budget, keep, right, model="m"):
        shape = {"model": model, "data": data, "questions": 4, "N": 256, "budget": budget}
        return {"bench": "accuracy", "shape": shape, "impl": method, "method": method,
                "keep": keep, "accuracy": right.count("1") / 4, "correct": right.count("1"),
                "ci95": [0, 1], "agreement": 1.0, "agree": 4, "right": right, **env}

    rows = []
    for data in ("world test", "world cluttered"):
        rows += [row(data, "unpruned", 1.0, 256, "1111"),
                 row(data, "ratio 0 (DivPrune)", 0.05, 13, "1100"),
                 row(data, "ratio 1 (relevance only)", 0.05, 13, "1011")]
    rows += [row("world test", "unpruned", 1.0, 256, "1111", model="m2"),  # same run, other model
             row("world test", "ratio 0 (DivPrune)", 0.05, 13, "1111", model="m2"),
             row("world test", "ratio 1 (relevance only)", 0.05, 13, "0000", model="m2")]
    for prompt, hits in (("all", "0011"), ("message", "1111")):
        rows.append({"bench": "relevance_coverage", "prompt": prompt, "impl": prompt, "keep": 13,
                     "shape": {"model": "m", "data": "world cluttered", "questions": 4,
                               "N": 256, "budget": 0.05},
                     "covered": hits.count("1") / 4, "on_named": 0.1, "random_covered": 0.3,
                     "auc": 0.6, "hits": hits, **env})
    text = results.render(rows)
    assert text.count("| 5% (13 tokens) | +25.0 ± ") == 2  # 1011 - 1100, per data set
    assert "m on world test" in text and "m on world cluttered" in text
    assert "m2 on world test" in text and text.count("| 5% (13 tokens) | -100.0 ± ") == 1
    assert "| 13 | 50.0 (10.0) | 100.0 (10.0) | 30.0 | +50.0 ± " in text
