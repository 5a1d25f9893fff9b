"""End-to-end benchmark: prefill of a ZSPAPrune-wrapped model against the unpruned model.

    python bench/bench_e2e.py                          # llava-1.5-7b preset, bf16 on a GPU
    python bench/bench_e2e.py --family qwen2_5_vl      # qwen2.5-vl-7b preset, bf16 on a GPU
    python bench/bench_e2e.py --family internvl        # internvl3-8b on a GPU, internvl-cpu-small
                                                       # on the CPU (also llava_onevision, gemma3)
    python bench/bench_e2e.py --preset cpu-small       # scaled-down config on the CPU
    python bench/bench_e2e.py --preset tiny --no-record

The model is built from a config with random weights (``zspaprune_ops.testing.tiny_<family>``):
timings depend on shapes only. The input is one image and ``--text`` prompt tokens. LLaVA: 576
visual tokens (336x336); Qwen2.5-VL: 576 (672x672, 48x48 patches merged 2x2); LLaVA-OneVision:
an any-resolution image of 2x2 tiles (7B: 729 base + 2,916 grid + 54 newline tokens = 3,699);
InternVL: 12 tiles + thumbnail (8B: 13 x 256 = 3,328 tokens); Gemma 3: an original view + 4
pan-and-scan crops (4B: 5 x 256 = 1,280 tokens, with ``token_type_ids``). Prefill = one forward
over the whole prompt with ``logits_to_keep=1``, as
``generate`` runs it: the unpruned model runs vision tower + LLM; the wrapped one vision tower +
selection + LLM over the shortened sequence. ``selection`` is the op alone on the same features
and prompt, and ``selection_share`` its share of the wrapped prefill.

Rows (bench ``e2e_prefill``: impl ``unpruned`` at keep = N, the image's tokens, for any
``--keep`` >= N; ``zspaprune`` and ``selection`` at smaller budgets) go to ``--out FILE``
(default: a fresh git-ignored file under ``bench/results/local/``; ``--out
bench/results/<device>.json`` adds to the committed results).
"""
import argparse
from pathlib import Path

import torch

import results
import zspaprune_ops
from zspaprune_ops._validate import FEATURE_DTYPES
from zspaprune_ops.testing.measure import interleaved_medians, peak_bytes, resident_bytes
from zspaprune_ops.testing.tiny_llava import LLAVA_15_7B_SIZES, SPECIAL_TOKENS, build_model

PRESETS = {
    "llava-1.5-7b": LLAVA_15_7B_SIZES,
    "cpu-small": dict(image_size=336, patch_size=14, vision_hidden=256, vision_layers=4,
                      vision_heads=4, vision_intermediate=1024, text_hidden=512, text_layers=4,
                      text_heads=8, text_kv_heads=8, intermediate=1408, vocab_size=32064),
    "tiny": dict(image_size=336, patch_size=14, vision_hidden=32, vision_layers=1,
                 vision_heads=2, text_hidden=64, text_layers=1, text_heads=2, text_kv_heads=2,
                 intermediate=128, vocab_size=256),
}
"""LLaVA model shapes; all keep LLaVA-1.5's 24x24 patch grid (576 visual tokens per image)."""

QWEN_PRESETS = {
    "qwen2.5-vl-7b": "QWEN2_5_VL_7B_SIZES",
    "qwen-cpu-small": dict(patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
                           vision_intermediate=1024, text_hidden=512, text_layers=4,
                           text_heads=8, text_kv_heads=2, intermediate=1408, vocab_size=32064),
}
"""Qwen2.5-VL shapes (``tiny_qwen``); a 672x672 image gives 576 merged visual tokens."""
QWEN_IMAGE = 672

_CPU_SMALL = dict(patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
                  vision_intermediate=1024, text_hidden=512, text_layers=4, text_heads=8,
                  text_kv_heads=2, intermediate=1408, vocab_size=32064)
FAMILY_PRESETS = {
    "onevision-7b": ("llava_onevision", "ONEVISION_7B_SIZES"),
    "onevision-cpu-small": ("llava_onevision", dict(_CPU_SMALL, image_size=384)),
    "internvl3-8b": ("internvl", "INTERNVL3_8B_SIZES"),
    "internvl-cpu-small": ("internvl", dict(_CPU_SMALL, image_size=448, max_tiles=12)),
    "gemma3-4b": ("gemma3", "GEMMA3_4B_SIZES"),
    "gemma3-cpu-small": ("gemma3", dict(_CPU_SMALL, image_size=448, head_dim=64,
                                        tokens_per_image=256, text_layers=6, sliding_pattern=6,
                                        sliding_window=1024)),
}
"""LLaVA-OneVision, InternVL and Gemma 3 shapes (``tiny_onevision`` / ``tiny_internvl`` /
``tiny_gemma3``): the 7B / 8B / 4B checkpoints, and scaled down for the CPU with the same visual
token counts per tile (729 / 256 / 256)."""
DEFAULT_PRESETS = {("llava", True): "llava-1.5-7b", ("llava", False): "cpu-small",
                   ("qwen2_5_vl", True): "qwen2.5-vl-7b", ("qwen2_5_vl", False): "qwen-cpu-small",
                   ("llava_onevision", True): "onevision-7b",
                   ("llava_onevision", False): "onevision-cpu-small",
                   ("internvl", True): "internvl3-8b", ("internvl", False): "internvl-cpu-small",
                   ("gemma3", True): "gemma3-4b", ("gemma3", False): "gemma3-cpu-small"}
FAMILIES = sorted({family for family, _ in DEFAULT_PRESETS})
DEFAULT_KEEPS = {"llava": [576, 192, 128, 64], "qwen2_5_vl": [576, 192, 128, 64]}
"""Budgets per family (others: every token, then 576, 192 and 64)."""


def build(preset: str, seed: int, device, dtype):
    """The random-weight model of ``preset``."""
    if preset in PRESETS:
        return build_model("llava", seed=seed, device=device, dtype=dtype, **PRESETS[preset])
    if preset in FAMILY_PRESETS:
        family, sizes = FAMILY_PRESETS[preset]
        builder = _builder(family)
        sizes = getattr(builder, sizes) if isinstance(sizes, str) else sizes
        return builder.build_model(seed=seed, device=device, dtype=dtype, **sizes)
    from zspaprune_ops.testing import tiny_qwen

    sizes = QWEN_PRESETS[preset]
    sizes = getattr(tiny_qwen, sizes) if isinstance(sizes, str) else sizes
    return tiny_qwen.build_model("qwen2_5_vl", seed=seed, device=device, dtype=dtype, **sizes)


def _builder(family: str):
    import importlib

    name = {"llava_onevision": "tiny_onevision"}.get(family, f"tiny_{family}")
    return importlib.import_module(f"zspaprune_ops.testing.{name}")


def make_inputs(config, text_tokens: int, device: torch.device, dtype: torch.dtype, seed: int):
    """One sample: a start token, the image placeholders, ``text_tokens`` random text tokens.
    Returns (model inputs, visual tokens N, inputs for the wrapper only)."""
    if config.model_type in ("llava_onevision", "internvl", "gemma3"):
        return family_inputs(config, text_tokens, device, dtype, seed)
    generator = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    text = torch.randint(len(SPECIAL_TOKENS), config.text_config.vocab_size, (text_tokens,),
                         generator=generator)
    extra = {}
    if config.model_type == "qwen2_5_vl":
        grid = QWEN_IMAGE // vision.patch_size
        n_visual = grid * grid // 4
        pixels = torch.randn(grid * grid, 3 * 2 * vision.patch_size ** 2, generator=generator)
        extra["image_grid_thw"] = torch.tensor([[1, grid, grid]], device=device)
        ends = [config.vision_start_token_id], [config.vision_end_token_id]
    else:
        n_visual = (vision.image_size // vision.patch_size) ** 2
        pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=generator)
        ends = [], []
    bos = torch.tensor([config.text_config.bos_token_id, *ends[0]])
    image = torch.full((n_visual,), config.image_token_id)
    input_ids = torch.cat([bos, image, torch.tensor(ends[1], dtype=torch.int64), text])[None]
    input_ids = input_ids.to(device)
    if config.model_type == "qwen2_5_vl":  # without it the model numbers tokens like text
        extra["mm_token_type_ids"] = (input_ids == config.image_token_id).long()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels.to(device, dtype), **extra}, n_visual, {}


def family_inputs(config, text_tokens: int, device, dtype, seed: int):
    """``make_inputs`` for LLaVA-OneVision (one any-resolution image of 2x2 tiles), InternVL (12
    tiles + thumbnail) and Gemma 3 (an original view + 4 pan-and-scan crops)."""
    generator = torch.Generator().manual_seed(seed)
    family = config.model_type
    builder = _builder(family)
    vision, vocab = config.vision_config, config.text_config.vocab_size

    def text(count):
        return torch.randint(len(builder.SPECIAL_TOKENS), vocab, (count,), generator=generator)

    def tokens(*ids):
        return torch.tensor(ids, dtype=torch.int64)

    image_id, extra, wrapper_only = config.image_token_id, {}, {}
    if family == "llava_onevision":
        size, side = vision.image_size, vision.image_size // vision.patch_size
        n_visual = side * side + (2 * side) ** 2 + 2 * side  # base, 2x2 grid, row newlines
        pixels = torch.randn(1, 5, 3, size, size, generator=generator)
        extra = {"image_sizes": torch.tensor([[2 * size, 2 * size]], device=device),
                 "batch_num_images": torch.tensor([1], device=device)}
        parts = [tokens(builder.IM_START), torch.full((n_visual,), image_id)]
    elif family == "internvl":
        per_tile, tiles = config.image_seq_length, 13
        n_visual = tiles * per_tile
        pixels = torch.randn(tiles, 3, *vision.image_size, generator=generator)
        parts = [tokens(builder.IM_START, builder.IMG_START), torch.full((n_visual,), image_id),
                 tokens(builder.IMG_END)]
    else:
        per_view, views = config.mm_tokens_per_image, 5
        n_visual = views * per_view
        pixels = torch.randn(views, 3, vision.image_size, vision.image_size, generator=generator)
        parts = [tokens(builder.BOS)]
        for _ in range(views):
            parts += [text(2), tokens(config.boi_token_id), torch.full((per_view,), image_id),
                      tokens(config.eoi_token_id)]
        wrapper_only = {"num_crops": [views - 1]}  # what the processor's text says, no tokenizer
    input_ids = torch.cat(parts + [text(text_tokens)])[None].to(device)
    if family == "gemma3":  # its bidirectional image attention
        extra["token_type_ids"] = (input_ids == image_id).long()
    return ({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "pixel_values": pixels.to(device, dtype), **extra}, n_visual, wrapper_only)


def memory(fn, resident_tensors, device) -> dict:
    """peak_bytes (None if unmeasured) and extra_peak_bytes: the peak above what was resident
    before the call (on CPU: ``resident_tensors``, what the call reads)."""
    peak = peak_bytes(fn, device)
    extra = None if peak is None else peak - resident_bytes(resident_tensors, device)
    return {"peak_bytes": peak, "extra_peak_bytes": extra}


def selection_call(wrapped, inputs: dict):
    """(call, its input tensors): the op call the wrapper makes for ``inputs``."""
    with torch.inference_mode():
        pruned = wrapped.prune_inputs(**inputs)
        ids = inputs["input_ids"]
        placeholders = ids == wrapped.model.config.image_token_id
        embeds = wrapped.model.get_input_embeddings()(ids.masked_fill(placeholders, 0))
    visual = torch.stack(pruned.image_features)
    newline = getattr(wrapped.model.model, "image_newline", None)  # never a candidate
    visual_mask = None if newline is None else (visual != newline.to(visual)).any(-1)
    prompt_mask = ~placeholders & inputs["attention_mask"].bool()
    return (lambda: torch.ops.zspaprune.select(visual, embeds, wrapped.keep,
                                               wrapped.relevance_ratio, prompt_mask,
                                               visual_mask),
            [visual, embeds, prompt_mask])


def run(preset: str, keeps, text_tokens: int, ratio: float, repeat: int,
        device: torch.device, dtype: torch.dtype, seed: int = 0) -> list:
    """Benchmark rows: unpruned at keep >= N, wrapped + selection-only below; all callables
    are timed in turns (``interleaved_medians``)."""
    model = build(preset, seed, device, dtype)
    inputs, n_visual, wrapper_only = make_inputs(model.config, text_tokens, device, dtype, seed)
    shape = {"model": preset, "dtype": str(dtype).replace("torch.", ""), "N": n_visual,
             "T": text_tokens, "ratio": ratio}
    model_tensors = list(model.parameters()) + list(model.buffers()) + list(inputs.values())
    cases = []  # (keep, impl, call, tensors it reads)
    for keep in sorted(set(keeps), reverse=True):
        if keep >= n_visual:
            cases.append((n_visual, "unpruned", lambda: model(**inputs, logits_to_keep=1),
                          model_tensors))
            continue
        wrapped = zspaprune_ops.prune(model, keep=keep, relevance_ratio=ratio)
        cases.append((keep, "zspaprune", lambda w=wrapped: w(**inputs, **wrapper_only,
                                                             logits_to_keep=1),
                      model_tensors))
        cases.append((keep, "selection", *selection_call(wrapped, {**inputs, **wrapper_only})))
    seconds = interleaved_medians([case[2] for case in cases], device, repeat)
    rows = [{"bench": "e2e_prefill", "shape": {**shape, "keep": keep}, "impl": impl,
             "median_us": s * 1e6, **memory(call, tensors, device)}
            for (keep, impl, call, tensors), s in zip(cases, seconds)]
    unpruned = [row["median_us"] for row in rows if row["impl"] == "unpruned"]
    for row, selection in zip(rows, rows[1:]):
        if row["impl"] == "zspaprune":
            row["selection_share"] = selection["median_us"] / row["median_us"]
            if unpruned:
                row["speedup_vs_unpruned"] = unpruned[0] / row["median_us"]
    return rows


def format_rows(rows) -> str:
    lines = [f"{'keep':>5} {'impl':>10} {'median ms':>10} {'peak MiB':>9} {'extra MiB':>9} "
             f"{'sel. share':>10} {'speed-up':>8}"]
    for row in rows:
        mib = (lambda b: "n/a" if b is None else f"{b / 2**20:.1f}")
        share = row.get("selection_share")
        speed = row.get("speedup_vs_unpruned")
        lines.append(f"{row['shape']['keep']:>5} {row['impl']:>10} {row['median_us'] / 1e3:>10.2f} "
                     f"{mib(row['peak_bytes']):>9} {mib(row['extra_peak_bytes']):>9} "
                     f"{'' if share is None else f'{share:.1%}':>10} "
                     f"{'' if speed is None else f'{speed:.2f}x':>8}")
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="llava",
                        help="model family of the default preset (llava)")
    parser.add_argument("--preset",
                        choices=sorted(PRESETS) + sorted(QWEN_PRESETS) + sorted(FAMILY_PRESETS),
                        help="model shapes (default: the family's 7B / 8B / 4B checkpoint on "
                             "cuda, its cpu-small on cpu)")
    parser.add_argument("--keep", type=int, nargs="+",
                        help="budgets; one >= the image's tokens means unpruned (LLaVA, Qwen: "
                             "576 192 128 64; others: 100000 576 192 64)")
    parser.add_argument("--text", type=int, default=40, help="text tokens in the prompt (40)")
    parser.add_argument("--ratio", type=float, default=0.5, help="relevance ratio (0.5)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case (10)")
    parser.add_argument("--device", help="torch device (cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(FEATURE_DTYPES),
                        help="bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--out", type=Path,
                        help="results file the rows are appended to (default: a new file "
                             "bench/results/local/<device>-<time>.json, git-ignored)")
    parser.add_argument("--no-record", action="store_true", help="print only, write no rows")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = FEATURE_DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    preset = args.preset or DEFAULT_PRESETS[args.family, device.type == "cuda"]
    family = FAMILY_PRESETS[preset][0] if preset in FAMILY_PRESETS else args.family
    keeps = args.keep or DEFAULT_KEEPS.get(family, [100_000, 576, 192, 64])
    rows = run(preset, keeps, args.text, args.ratio, args.repeat, device, dtype)
    print(f"e2e prefill, {preset}, {dtype}, {results.device_name(device)}")
    print(format_rows(rows))
    if not args.no_record:
        path = results.append(rows, device, args.out or results.new_results_file(device))
        print(f"recorded in {path}; render with python bench/results.py {path}")
    return rows


if __name__ == "__main__":
    main()
