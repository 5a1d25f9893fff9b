"""`zspaprune demo` end to end on the tiny default and a tiny LLaVA-NeXT, and the e2e benchmark.

The demo's kept tokens and relevance core are checked against the pure-PyTorch reference on
the model's own features, and the PNG pixel by pixel: every kept patch framed in its colour,
no other patch framed.
"""
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from zspaprune_ops import demo  # noqa: E402
from zspaprune_ops.checkpoint import DEMO_PROMPT, SAMPLE_IMAGE, load, prompt_text  # noqa: E402
from zspaprune_ops.cli import build_parser  # noqa: E402
from zspaprune_ops.models.llava import ZSPAPruneLlava  # noqa: E402
from zspaprune_ops.testing.measure import interleaved_medians  # noqa: E402
from zspaprune_ops.demo.grids import token_grids  # noqa: E402
from zspaprune_ops.demo.overlay import (CORE_COLOUR, FILL_COLOUR, Budget,  # noqa: E402
                                        draw_overlay, figure_layout, views)
from zspaprune_ops.models import wrapper_class  # noqa: E402
from zspaprune_ops.prompt import ChatLayout, prompt_positions  # noqa: E402
from zspaprune_ops.reference import naive  # noqa: E402
from zspaprune_ops.choice import Budget as Pruning  # noqa: E402
from literal import replay  # noqa: E402
from zspaprune_ops.rule import core_size  # noqa: E402
from zspaprune_ops.testing.tiny_llava import build_tiny_llava  # noqa: E402
from zspaprune_ops.world import scenes  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent / "bench"
ROW = re.compile(r"^\s*(all|\d+)\s+(\d+)%\s+(\d+)\s+([\d.]+)\s+([\d.]+)x\s+(-|\d+)\s+(-|\d+)\s")
"""A table row: keep, share %, seq len, LM MiB, vs all, core, fill."""

RATIO = Pruning.relevance_ratio  # the demo's default ratio


def run_demo(*argv):
    args = build_parser().parse_args(["demo", "--repeat", "1", "--max-new-tokens", "2", *argv])
    return args.run(args)


def model_inputs(model, processor, image, prompt=DEMO_PROMPT):
    return processor(images=image, text=prompt_text(processor, prompt), return_tensors="pt")


def check_selection(model, processor, inputs, row, ratio):
    """The demo row's kept tokens and core are the rule's on the wrapper's own candidates and
    the demo's relevance prompt (the user's words where the model has a chat template), for the
    first image: the core exactly the reference's, the kept tokens the float64 rule's up to
    genuine float32 near-ties (the CPU fast path may take the other side of one)."""
    family = wrapper_class(model)
    wrapped = family(model, keep=row.keep, relevance_ratio=ratio, prompt="all")
    names = ("input_ids", "pixel_values", "attention_mask", *family.visual_inputs)
    with torch.no_grad():
        features = wrapped.prune_inputs(**{k: v for k, v in inputs.items()
                                           if k in names}).image_features[0]
        ids = inputs["input_ids"].masked_fill(inputs["input_ids"] >= model.config.get_text_config()
                                              .vocab_size, 0)  # Gemma 3's image id: no row
        embeds = model.get_input_embeddings()(ids)[0]
    ids, image = inputs["input_ids"][0].tolist(), model.config.image_token_id
    layout = ChatLayout.of(processor)
    inserted = re.compile(family.inserted_text) if family.inserted_text else None
    (positions,) = prompt_positions(ids, [ids.index(image)], [image], layout,
                                    "message" if layout else "all", inserted)
    prompt_mask = torch.zeros(len(ids), dtype=torch.bool)
    prompt_mask[positions] = True
    newline = getattr(model.model, "image_newline", None)  # LLaVA-NeXT's: never a candidate
    candidates = (torch.ones(len(features), dtype=torch.bool) if newline is None
                  else ~(features == newline.to(features)).all(dim=-1))
    replay(features, embeds, row.keep, ratio, torch.tensor(row.kept), prompt_mask=prompt_mask,
           visual_mask=candidates)
    n_core = core_size(row.keep, ratio)
    core = [] if n_core == 0 else naive.select(features, embeds, n_core, 1.0,
                                               prompt_mask=prompt_mask,
                                               visual_mask=candidates).tolist()
    assert row.core == core


def framed_cells(png, layout, grid, view_index, budget_index):
    """{(row, col): colour} of the cells whose top-left pixel is a frame colour."""
    left, top = layout.origin(view_index, budget_index)
    cells = {}
    for row in range(grid.rows):
        for col in range(grid.cols):
            x, y = layout.cell_box(grid, row, col)[:2]
            pixel = png.getpixel((left + x, top + y))
            if pixel in (CORE_COLOUR, FILL_COLOUR):
                cells[(row, col)] = pixel
    return cells


def expected_cells(grid, kept, core):
    cells = {}
    for token in kept:
        if grid.cell(token) is not None:
            cells[grid.cell(token)] = CORE_COLOUR if token in core else FILL_COLOUR
    return cells


def check_png(result, model, processor, image):
    """Every kept patch framed in its colour, no other; a header and an answer line."""
    grids, _ = token_grids(model.config, processor.image_processor, image.size,
                           result.image_tokens)
    png = Image.open(result.png).convert("RGB")
    pruned = result.rows[1:]
    panels = [Budget("", row.kept, row.core, row.text) for row in pruned]
    layout = figure_layout(grids, panels, header=["question", "unpruned answer"])
    assert png.size == layout.size
    for v, view in enumerate(views(grids)):
        for grid in view:
            for b, row in enumerate(pruned):
                assert framed_cells(png, layout, grid, v, b) == expected_cells(grid, row.kept,
                                                                               row.core)
    return grids


def kv_cache_bytes(config, sequence_length: int) -> int:
    """Bytes of the float32 KV cache a prefill of ``sequence_length`` tokens builds."""
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * sequence_length * 4


def test_demo_default_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_demo("--out", str(tmp_path / "out" / "demo.png"))
    out = capsys.readouterr().out
    scene = scenes.sample(*demo.WORLD_SCENE)
    assert "shapes-world LLaVA shipped with zspaprune" in out
    assert f"question: {scene.question!r}   ground truth: {scene.answer!r}" in out
    assert f"chat-formatted: {result.prompt.chat!r}" in out and scene.question in result.prompt.chat
    assert "relevance prompt: " in out and "warning" not in out  # every word is the world's
    assert f"overlay: {result.png}" in out
    assert "centre-cropped" not in out and "no selection" not in out  # a square 224 px image

    # What each budget does comes first: the table, unpruned first, then 1/2, 1/4, 1/9, 1/20
    # of 256; each budget shortens the sequence by exactly the pruned tokens, its LM memory
    # ratio is the column's, and it splits into core + fill by the rule.
    assert out.index("What a budget does") < out.index("prefill ms")
    lines = [line for line in out.splitlines() if ROW.match(line)]
    rows = [ROW.match(line).groups() for line in lines]
    assert [(r[0], r[1]) for r in rows] == [("all", "100"), ("128", "50"), ("64", "25"),
                                            ("28", "11"), ("13", "5")]
    full_length = int(rows[0][2])
    assert full_length == result.rows[0].sequence_length
    base_bytes = result.rows[0].lm_prefill_bytes
    for (keep, _, length, _, ratio, core, fill), row in zip(rows[1:], result.rows[1:]):
        keep = int(keep)
        assert int(length) == full_length - 256 + keep
        assert float(ratio) == pytest.approx(row.lm_prefill_bytes / base_bytes, abs=0.006)
        assert (int(core), int(fill)) == (core_size(keep, RATIO), keep - core_size(keep, RATIO))
    # Each answer is marked against the ground truth; the default scene is one the shipped
    # model answers right unpruned.
    for line, row in zip(lines, result.rows):
        verdict = "right" if row.text.strip() == scene.answer else "wrong"
        assert line.endswith(f"{row.text!r} {verdict}")
    assert result.rows[0].text.strip() == scene.answer

    # The timings, after the table, say why they cannot show a speed-up here and where to look.
    assert "These times cannot show what pruning saves" in out and "bench/RESULTS.md" in out
    assert result.lm_parameters < 1e6

    # The kept tokens and the core are the reference rule's, on the model's own features.
    model, processor = load(None, torch.device("cpu"), torch.float32)
    assert result.image_tokens == 256
    inputs = model_inputs(model, processor, scene.image, scene.question)
    for row in result.rows[1:]:
        check_selection(model, processor, inputs, row, RATIO)
    check_png(result, model, processor, scene.image)

    # The LM memory column: at least the KV cache of the row's sequence, smaller for each
    # smaller budget (CPU: the torch profiler's timeline).
    lm_bytes = [row.lm_prefill_bytes for row in result.rows]
    for row in result.rows:
        assert row.lm_prefill_bytes >= kv_cache_bytes(model.config, row.sequence_length)
    assert lm_bytes == sorted(lm_bytes, reverse=True) and len(set(lm_bytes)) == 5


def test_unknown_prompt_words_are_named(tmp_path, monkeypatch, capsys):
    """The shapes-world model knows its world's words only: others become <unk>, and the demo
    says which, and lists the words it knows."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_demo("--prompt", "What colour is the elephant?", "--keep", "0.25",
                      "--out", str(tmp_path / "u.png"))
    out = capsys.readouterr().out
    assert result.prompt.unknown_words == ["colour", "elephant"]
    assert "warning: the model's tokenizer does not know 'colour', 'elephant'" in out
    assert "circle" in out.split("it knows: ", 1)[1].split()
    assert "ground truth" not in out and [row.keep for row in result.rows] == [None, 64]


def test_overlay_shows_the_question_and_each_answer(tmp_path):
    """The header and each panel's answer line are drawn (dark pixels in their strips), and a
    text wider than its panel is cut to fit."""
    image = Image.open(SAMPLE_IMAGE).convert("RGB")
    grid = token_grids(build_config_llava(), None, image.size, 16)[0][0]
    panels = [Budget("keep 4", [0, 5], [5], "answer: " + "a very long answer " * 20),
              Budget("keep 2", [3], [], "")]
    header = ["Q: What is in front of the red house?", "unpruned: 'a ball'"]
    figure = draw_overlay(image, [grid], panels, header)
    layout = figure_layout([grid], panels, header)
    assert figure.size == layout.size and layout.title_lines == 2 and layout.header_lines == 2

    def dark(box):
        pixels = figure.crop(box).convert("L").getdata()
        return sum(value < 100 for value in pixels)

    width = figure.size[0]
    assert dark((0, 0, width, 18)) > 20 and dark((0, 18, width, 36)) > 20  # two header lines
    left, top = layout.origin(0, 0)
    answer_strip = (left, top - 18, left + layout.panel[0], top)
    assert dark(answer_strip) > 20
    assert dark((left + layout.panel[0], top - 18, left + layout.panel[0] + 8, top)) == 0  # cut


def test_shipped_model_is_small_fp16_and_loads_offline(monkeypatch):
    from safetensors.torch import load_file

    from zspaprune_ops.world.model import SHIPPED_MODEL

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = SHIPPED_MODEL / "model.safetensors"
    assert weights.stat().st_size < 3 * 2**20
    assert {t.dtype for t in load_file(weights).values()} == {torch.float16}
    model, processor = load(None, torch.device("cpu"), torch.float32)
    assert model.config.image_seq_length == 256 and model.dtype == torch.float32
    assert processor.tokenizer.convert_tokens_to_ids("circle") != processor.tokenizer.unk_token_id


def test_demo_llava_next_draws_base_and_high_res_grids(tmp_path, capsys):
    folder = build_tiny_llava(tmp_path / "next", kind="llava_next")
    wide = Image.open(SAMPLE_IMAGE).crop((0, 60, 336, 276))
    wide.save(tmp_path / "wide.png")
    result = run_demo("--model", str(folder), "--image", str(tmp_path / "wide.png"), "--keep",
                      "10", "5", "--ratio", "0.6", "--out", str(tmp_path / "next.png"))
    out = capsys.readouterr().out
    assert "TINY RANDOM-WEIGHT" not in out and "image-newline tokens" in out
    model = ZSPAPruneLlava.from_pretrained(str(folder)).model
    processor = AutoProcessor.from_pretrained(str(folder))
    inputs = model_inputs(model, processor, wide)
    for row in result.rows[1:]:
        pruned_away = result.image_tokens - row.keep  # newlines included: dropped when pruned
        assert row.sequence_length == result.rows[0].sequence_length - pruned_away
        check_selection(model, processor, inputs, row, 0.6)
    grids = check_png(result, model, processor, wide)
    assert [g.name for g in grids] == ["base grid", "high-res grid"]
    base, high = grids
    assert base.rows * base.cols + high.rows * (high.cols + 1) == result.image_tokens


def test_budgets_at_or_above_the_image_tokens_are_named_once(tmp_path, capsys):
    """16 image tokens: keep 20 and 16 select nothing, one note and no rows of their own; a
    repeated budget is one row; a wide image is centre-cropped and the report says so."""
    folder = build_tiny_llava(tmp_path / "llava", kind="llava")
    Image.open(SAMPLE_IMAGE).crop((0, 60, 336, 276)).save(tmp_path / "wide.png")
    out_png = tmp_path / "o.png"
    result = run_demo("--model", str(folder), "--image", str(tmp_path / "wide.png"), "--keep",
                      "20", "8", "16", "8", "--out", str(out_png))
    out = capsys.readouterr().out
    assert result.image_tokens == 16 and result.unselected == [20, 16]
    assert [row.keep for row in result.rows] == [None, 8]
    assert out.count("no selection") == 1
    assert "keep 20, 16: the whole image (16 tokens), no selection" in out
    # the tiny model has a chat template: the relevance prompt is the question's words
    assert result.prompt.mode == "message" and result.prompt.text.strip() == DEMO_PROMPT
    assert "centre-cropped" in out and "pixels (60, 0) to (276, 216) of the 336x216 image" in out
    assert result.png == out_png and out_png.exists()

    result = run_demo("--model", str(folder), "--keep", "16", "1.0", "--out",
                      str(tmp_path / "n.png"))
    out = capsys.readouterr().out
    assert [row.keep for row in result.rows] == [None] and result.png is None
    assert result.unselected == [16, 1.0]
    assert "no overlay: no budget prunes the image" in out
    assert not (tmp_path / "n.png").exists()


def test_every_variant_is_warmed_up_before_any_is_timed():
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    interleaved_medians(fns, torch.device("cpu"), repeat=3, warmup=2)
    assert calls == list("aabbcc") + list("abc") * 3


def test_bench_e2e_tiny_preset_records_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    results = importlib.import_module("results")
    bench = importlib.import_module("bench_e2e")
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    argv = ["--preset", "tiny", "--keep", "576", "64", "--text", "8", "--repeat", "1"]
    rows = bench.main([*argv, "--out", str(tmp_path / "mine.json")])
    assert [(r["impl"], r["shape"]["keep"]) for r in rows] == [
        ("unpruned", 576), ("zspaprune", 64), ("selection", 64)]
    for row in rows:
        assert row["bench"] == "e2e_prefill" and row["median_us"] > 0
    assert 0 < rows[1]["selection_share"] and rows[1]["speedup_vs_unpruned"] > 0
    assert list(tmp_path.rglob("*.json")) == [tmp_path / "mine.json"]
    assert "e2e_prefill" in (tmp_path / "mine.json").read_text()
    assert f"recorded in {tmp_path / 'mine.json'}" in capsys.readouterr().out
    bench.main(argv)  # no --out: a fresh file under local/, never a committed one
    (fresh,) = (tmp_path / "local").glob("cpu-*.json")
    assert len(json.loads(fresh.read_text())) == 3
    sys.modules.pop("bench_e2e", None)


def test_bundled_sample_image_is_the_drawing_script_output():
    spec = importlib.util.spec_from_file_location(
        "make_sample", SAMPLE_IMAGE.parent / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bundled = Image.open(SAMPLE_IMAGE)
    assert bundled.mode == "RGB" and SAMPLE_IMAGE.stat().st_size < 50_000
    drawn = module.draw_sample()
    assert bundled.size == drawn.size and bundled.tobytes() == drawn.tobytes()


def build_config_llava():
    from zspaprune_ops.testing.tiny_llava import build_config
    return build_config("llava")


def test_budgets_are_counts_or_shares_of_the_image():
    """``--keep`` as the wrappers take it: 64 is 64 tokens, 0.25 a quarter (rounded half up,
    at least 1); budgets that keep the same count are one row, whole-image ones none."""
    pruning, whole = demo.split_budgets([0.5, 64, 0.25, 0.1111, 0.05, 1.0, 300, 0.001], 256)
    assert pruning == [(0.5, 128), (64, 64), (0.1111, 28), (0.05, 13), (0.001, 1)]
    assert whole == [1.0, 300]
    assert demo.split_budgets([0.05], 576)[0] == [(0.05, 29)]  # 28.8 -> 29


def test_qwen_tokens_tile_the_resized_image():
    """Qwen's merged tokens in raster order over the whole (resized, not cropped) image."""
    from zspaprune_ops.testing.tiny_qwen import build_config
    config = build_config("qwen2_5_vl")
    merge = config.vision_config.spatial_merge_size
    grid_thw = torch.tensor([1, 6 * merge, 4 * merge])
    (grid,), note = token_grids(config, None, (400, 600), 24, grid_thw)
    assert (grid.rows, grid.cols, grid.box) == (6, 4, (0, 0, 400, 600))
    assert [grid.cell(t) for t in (0, 3, 4, 23)] == [(0, 0), (0, 3), (1, 0), (5, 3)]
    assert f"{merge}x{merge} patches" in note
    assert token_grids(config, None, (400, 600), 25, grid_thw)[0] == []  # tokens do not match


def test_demo_runs_a_qwen_checkpoint(tmp_path):
    """``--model`` takes every supported family; Qwen with or without torchvision (without it,
    ``zspaprune_ops.qwen_processor`` builds the inputs)."""
    from zspaprune_ops.testing.tiny_qwen import build_tiny_qwen

    folder = build_tiny_qwen(tmp_path / "qwen", "qwen2_5_vl")
    result = run_demo("--model", str(folder), "--keep", "8", "--out", str(tmp_path / "kept.png"))
    assert [row.keep for row in result.rows] == [None, 8] and len(result.rows[1].kept) == 8


def _new_family(name, folder):
    from zspaprune_ops.testing import tiny_gemma3, tiny_internvl, tiny_onevision

    if name == "llava_onevision":
        return Path(tiny_onevision.build_tiny_onevision(folder))
    if name == "internvl":
        return Path(tiny_internvl.build_tiny_internvl(folder))
    return Path(tiny_gemma3.build_tiny_gemma3(folder))


@pytest.mark.parametrize("family, views_drawn", [
    ("llava_onevision", ["base grid", "high-res grid"]),
    ("internvl", ["tiles", "thumbnail"]),
    ("gemma3", [""]),  # its processor's default: no pan-and-scan
])
def test_demo_runs_the_new_families_and_draws_their_views(tmp_path, capsys, family, views_drawn):
    """OneVision (base + unpadded grid with newlines), InternVL (tiles + thumbnail) and Gemma 3
    (one view) through ``zspaprune demo --model``: each budget's
    kept tokens and core are the reference rule's on the wrapper's features (OneVision's
    processor gives ``batch_num_images``, Gemma 3's ``token_type_ids``), every kept patch is
    framed in its view, where the image processor put it, and no other."""
    from zspaprune_ops.checkpoint import load

    folder = _new_family(family, tmp_path / family)
    wide = Image.open(SAMPLE_IMAGE).convert("RGB").resize((96, 40))
    wide.save(tmp_path / "wide.png")
    result = run_demo("--model", str(folder), "--image", str(tmp_path / "wide.png"), "--keep",
                      "0.5", "0.2", "--ratio", "0.5", "--out", str(tmp_path / "kept.png"))
    assert "no overlay" not in capsys.readouterr().out
    model, processor = load(str(folder), torch.device("cpu"), torch.float32)
    inputs = dict(model_inputs(model, processor, wide))
    n = result.image_tokens
    assert n == int((inputs["input_ids"] == model.config.image_token_id).sum())
    for row in result.rows[1:]:
        assert row.sequence_length == result.rows[0].sequence_length - n + row.keep
        check_selection(model, processor, inputs, row, 0.5)  # a core to check
    grids = check_png(result, model, processor, wide)
    assert [view[0].name for view in views(grids)] == views_drawn
    assert sum(g.rows * g.cols for g in grids) == n - (  # every token drawn but newlines
        grids[-1].rows if family == "llava_onevision" else 0)


def test_gemma3_pan_and_scan_crops_are_drawn_where_the_processor_cut_them():
    """Gemma 3's crops: the original view, then the crops side by side along the longer side;
    each crop's pixels are the image processor's own on the box the overlay draws it in."""
    from zspaprune_ops.testing.tiny_gemma3 import build_config, build_processor

    config = build_config()
    processor = build_processor(config)
    image = Image.open(SAMPLE_IMAGE).convert("RGB").resize((100, 36))
    text = prompt_text(processor, "Where is the cat?")
    out = processor(images=image, text=text, return_tensors="pt", do_pan_and_scan=True,
                    pan_and_scan_min_crop_size=16)
    tokens = int((out["input_ids"] == config.image_token_id).sum())
    grids, note = token_grids(config, processor.image_processor, image.size, tokens)
    assert [view[0].name for view in views(grids)] == ["original view", "pan-and-scan crops"]
    assert len(grids) == len(out["pixel_values"]) == 4 and "3 pan-and-scan crops" in note
    assert [g.box for g in grids[1:]] == [(0, 0, 34, 36), (34, 0, 68, 36), (68, 0, 100, 36)]
    for grid, pixels in zip(grids, out["pixel_values"]):
        alone = processor.image_processor(image.crop(grid.box), return_tensors="pt")
        torch.testing.assert_close(alone["pixel_values"][0], pixels)
    assert [g.offset for g in grids] == [0, 16, 32, 48]
