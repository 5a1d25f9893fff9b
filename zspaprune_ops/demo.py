"""``zspaprune demo``: prune a LLaVA model's visual tokens at a few budgets and show the effect.

With no arguments it runs offline on an embedded default: a tiny random-weight LLaVA with
LLaVA-1.5's image geometry (336x336 pixels, 14-pixel patches: 576 visual tokens), built
deterministically by ``zspaprune_ops.tiny_llava`` and cached under ``$ZSPAPRUNE_CACHE`` (default
``~/.cache/zspaprune``), and the sample image shipped in ``zspaprune_ops/assets``. ``--model``
takes a local LLaVA-1.5 or LLaVA-NeXT checkpoint folder instead.

For each budget it prints the tokens kept, the prefill time (median; the unpruned model runs
vision tower + LLM prefill, the pruned one vision tower + selection + LLM prefill), the peak
tensor memory of that prefill and the greedy generation, and writes a PNG of the kept patches.
"""
import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from zspaprune_ops._validate import FEATURE_DTYPES
from zspaprune_ops.measure import interleaved_medians, peak_bytes, resident_bytes
from zspaprune_ops.rule import core_size

SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"
DEFAULT_PROMPT = "What is in front of the red house?"
DEFAULT_FRACTIONS = (1 / 3, 2 / 9, 1 / 9)  # of 576 image tokens: keep 192, 128, 64
TINY_NAME = "tiny-llava-336-v2"  # change the suffix whenever TINY_DEFAULT_SIZES change
TINY_DEFAULT_SIZES = dict(image_size=336, patch_size=14, vision_hidden=64, vision_layers=2,
                          vision_heads=2, text_hidden=512, text_layers=4, text_heads=8,
                          text_kv_heads=4, intermediate=1376)
"""The embedded default: LLaVA-1.5's 24x24 patch grid on a small random-weight model (12M
parameters, 50 MB cached). Its language model is just large enough that a shorter prefill
outweighs the selection on a CPU, as it does (by far) on a 7B model."""


def cache_root() -> Path:
    if os.environ.get("ZSPAPRUNE_CACHE"):
        return Path(os.environ["ZSPAPRUNE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "zspaprune"


def tiny_default_dir(rebuild: bool = False) -> Path:
    """The cached tiny default model folder, built on first use (or when ``rebuild``)."""
    folder = cache_root() / TINY_NAME
    if (folder / "complete").exists() and not rebuild:
        return folder
    from zspaprune_ops.tiny_llava import build_tiny_llava

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=TINY_NAME + ".", dir=folder.parent))
    build_tiny_llava(staging, kind="llava", seed=0, **TINY_DEFAULT_SIZES)
    (staging / "complete").write_text(TINY_NAME + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(staging, folder)  # atomic: a half-written build never looks complete
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "complete").exists():  # not a concurrent demo's finished build
            raise
    return folder


def load(model_path: Optional[str], device: torch.device, dtype: torch.dtype):
    """(model, processor, is_tiny_default); the default is rebuilt once if it fails to load."""
    from transformers import AutoProcessor
    from transformers.utils import logging

    from zspaprune_ops.llava import ZSPAPruneLlava

    logging.disable_progress_bar()  # the demo prints a table; loading bars would garble it
    if model_path is not None:
        wrapped = ZSPAPruneLlava.from_pretrained(model_path, dtype=dtype)
        return wrapped.model.to(device).eval(), AutoProcessor.from_pretrained(model_path), False
    for rebuild in (False, True):
        folder = tiny_default_dir(rebuild)
        try:
            wrapped = ZSPAPruneLlava.from_pretrained(str(folder), dtype=dtype)
            processor = AutoProcessor.from_pretrained(str(folder))
            return wrapped.model.to(device).eval(), processor, True
        except Exception:  # a corrupt or stale cache: rebuild it once, then let errors surface
            if rebuild:
                raise
    raise AssertionError("unreachable")


def prompt_text(processor, prompt: str) -> str:
    """The chat-formatted prompt with one image placeholder."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {image_token}\n{prompt} ASSISTANT:"


@dataclass
class BudgetResult:
    """One row of the demo: ``keep`` visual tokens per image (None: the unpruned model)."""

    keep: Optional[int]
    sequence_length: int
    prefill_seconds: float
    peak_bytes: Optional[int]
    extra_bytes: Optional[int]
    text: str
    kept: List[int] = field(default_factory=list)
    core: List[int] = field(default_factory=list)


@dataclass
class DemoResult:
    model_note: str
    image_tokens: int
    rows: List[BudgetResult]
    png: Path
    grids_note: str


def run(model, processor, image, prompt: str, keeps, relevance_ratio: float,
        max_new_tokens: int, repeat: int, device: torch.device, dtype: torch.dtype):
    """Measure the unpruned model and each budget in ``keeps`` (default: ``DEFAULT_FRACTIONS``
    of the image's tokens); returns (image_tokens, rows), the unpruned row first."""
    from zspaprune_ops.llava import ZSPAPruneLlava

    inputs = processor(images=image, text=prompt_text(processor, prompt), return_tensors="pt")
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
              for k, v in inputs.items()}
    input_length = inputs["input_ids"].shape[1]
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    decode = processor.tokenizer.decode
    keeps = keeps or [max(1, round(image_tokens * f)) for f in DEFAULT_FRACTIONS]

    models = [model] + [ZSPAPruneLlava(model, keep=min(keep, image_tokens),
                                       relevance_ratio=relevance_ratio) for keep in keeps]
    prefills = [lambda m=m: m(**inputs, logits_to_keep=1) for m in models]
    seconds = interleaved_medians(prefills, device, repeat)
    resident = resident_bytes([*model.parameters(), *model.buffers(), *inputs.values()], device)
    rows = []
    for runner, prefill, time_s in zip(models, prefills, seconds):
        peak = peak_bytes(prefill, device)
        peak = (peak, None if peak is None else peak - resident)
        new_tokens = runner.generate(**inputs, **generate_kwargs)[0]
        if runner is model:  # the model's own generate returns the prompt too
            rows.append(BudgetResult(None, input_length, time_s, *peak,
                                     decode(new_tokens[input_length:], skip_special_tokens=True)))
            continue
        with torch.inference_mode():
            pruned = runner.prune_inputs(**_prune_arguments(inputs))
        kept = [index for index in pruned.kept_indices[0].tolist() if index >= 0]
        selected = runner.keep < image_tokens  # else the image is kept whole, no selection
        core = relevance_core(model, inputs, runner.keep, relevance_ratio, kept) if selected else []
        rows.append(BudgetResult(runner.keep, pruned.inputs_embeds.shape[1], time_s, *peak,
                                 decode(new_tokens, skip_special_tokens=True), kept, core))
    return image_tokens, rows


def _prune_arguments(inputs: dict) -> dict:
    names = ("input_ids", "pixel_values", "attention_mask", "image_sizes")
    return {name: inputs[name] for name in names if name in inputs}


def relevance_core(model, inputs: dict, keep: int, relevance_ratio: float,
                   kept: List[int]) -> List[int]:
    """The core of the selection: the op itself run at ``keep = n_core`` with ratio 1.

    ZSPAPrune's core is the first n_core of the relevance ranking whatever the fill does,
    so this is exactly the core inside ``kept`` (checked).
    """
    from zspaprune_ops.llava import ZSPAPruneLlava

    n_core = core_size(keep, relevance_ratio)
    if n_core == 0:
        return []
    with torch.inference_mode():
        core = ZSPAPruneLlava(model, keep=n_core, relevance_ratio=1.0).prune_inputs(
            **_prune_arguments(inputs)).kept_indices[0].tolist()
    if not set(core) <= set(kept):
        raise RuntimeError(f"relevance core {core} is not inside the kept tokens {kept}")
    return core


def report(result: DemoResult, relevance_ratio: float, device: torch.device, repeat: int) -> str:
    """The printed table: one line per budget, the unpruned model first."""
    lines = [result.model_note,
             f"{result.image_tokens} visual tokens per image; relevance_ratio {relevance_ratio}; "
             f"prefill = forward over the whole prompt, median of {repeat} run(s) on {device}",
             "(pruned rows include the selection: vision tower + selection + LLM prefill; "
             "unpruned: vision tower + LLM prefill)", "",
             f"{'keep':>6} {'seq len':>7} {'core':>5} {'fill':>5} {'prefill ms':>10} "
             f"{'vs unpruned':>11} {'peak MiB':>9} {'extra MiB':>9} {'vs unpruned':>11}  "
             "generated text"]
    base = result.rows[0]
    for row in result.rows:
        pruned = row.keep is not None and row.keep < result.image_tokens  # selection ran
        cells = ["all" if row.keep is None else row.keep, row.sequence_length,
                 len(row.core) if pruned else "-", len(row.kept) - len(row.core) if pruned else "-",
                 f"{row.prefill_seconds * 1e3:.2f}",
                 _ratio(base.prefill_seconds, row.prefill_seconds),
                 _mib(row.peak_bytes), _mib(row.extra_bytes),
                 _ratio(row.extra_bytes, base.extra_bytes)]
        widths = (6, 7, 5, 5, 10, 11, 9, 9, 11)
        lines.append(" ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths))
                     + f"  {row.text!r}")
    profiler = "" if device.type == "cuda" else " (CPU: from the torch profiler's timeline)"
    lines += ["", "vs unpruned: prefill speed-up (unpruned time / this time) and extra-memory "
                  "ratio (this / unpruned). peak = tensors live during the prefill, weights "
                  f"included; extra = peak minus weights and inputs{profiler}",
              f"overlay of the kept patches: {result.png}"]
    if result.grids_note:
        lines.append(f"  ({result.grids_note})")
    return "\n".join(lines)


def _budget_label(row: BudgetResult, image_tokens: int) -> str:
    if row.keep >= image_tokens:
        return f"keep {row.keep} (all: no selection)"
    return f"keep {row.keep} (core {len(row.core)}, fill {len(row.kept) - len(row.core)})"


def _mib(size: Optional[int]) -> str:
    return "n/a" if size is None else f"{size / 2**20:.1f}"


def _ratio(numerator, denominator) -> str:
    return "n/a" if numerator is None or not denominator else f"{numerator / denominator:.2f}x"


def add_parser(commands) -> None:
    """Register the ``demo`` subcommand on an argparse subparsers object."""
    demo = commands.add_parser(
        "demo", help="prune a LLaVA model at a few budgets: timings, memory, text, overlay PNG",
        description="Prune a LLaVA model's visual tokens at a few budgets; print tokens kept, "
                    "prefill time, peak memory and generated text against the unpruned model, "
                    "and draw the kept patches. Runs offline on a tiny random-weight default "
                    "unless --model is given.")
    demo.add_argument("--model", help="local LLaVA-1.5 / LLaVA-NeXT checkpoint folder "
                                      "(default: the tiny random-weight model, built and cached)")
    demo.add_argument("--image", help="image file (default: the bundled sample)")
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"question ({DEFAULT_PROMPT!r})")
    demo.add_argument("--keep", type=int, nargs="+",
                      help="visual tokens to keep per image, one budget each (default: 1/3, "
                           "2/9 and 1/9 of the image tokens: 192 128 64 for 576)")
    demo.add_argument("--ratio", type=float, default=0.5, help="relevance ratio in [0, 1] (0.5)")
    demo.add_argument("--out", default="zspaprune_demo.png",
                      help="overlay PNG to write (zspaprune_demo.png)")
    demo.add_argument("--max-new-tokens", type=int, default=12, help="generated tokens (12)")
    demo.add_argument("--repeat", type=int, default=5, help="timed prefill runs per budget (5)")
    demo.add_argument("--device", help="torch device (cuda if available, else cpu)")
    demo.add_argument("--dtype", choices=sorted(FEATURE_DTYPES),
                      help="model dtype (bfloat16 on cuda, float32 on cpu)")
    demo.set_defaults(run=main)


def main(args: argparse.Namespace) -> DemoResult:
    """Run the demo for parsed ``args``; prints the table, writes the PNG, returns the result."""
    from PIL import Image

    from zspaprune_ops.overlay import Budget, draw_overlay, token_grids

    _check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = FEATURE_DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.manual_seed(0)
    model, processor, is_tiny = load(args.model, device, dtype)
    image = Image.open(args.image or SAMPLE_IMAGE).convert("RGB")
    if is_tiny:
        note = (f"model: the built-in TINY RANDOM-WEIGHT LLaVA ({cache_root() / TINY_NAME}); it "
                "is not trained, so its text is noise and its timings only show the mechanics. "
                "Pass --model PATH for a real LLaVA-1.5 / LLaVA-NeXT checkpoint.")
    else:
        note = f"model: {args.model} ({type(model).__name__}, {dtype}, {device})"
    image_tokens, rows = run(model, processor, image, args.prompt, args.keep, args.ratio,
                             args.max_new_tokens, args.repeat, device, dtype)
    grids, grids_note = token_grids(model.config, processor.image_processor, image.size,
                                    image_tokens)
    budgets = [Budget(_budget_label(row, image_tokens), row.kept, row.core) for row in rows[1:]]
    png = Path(args.out)
    png.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, grids, budgets).save(png)
    result = DemoResult(note, image_tokens, rows, png, grids_note)
    print(report(result, args.ratio, device, args.repeat))
    return result


def _check_args(args) -> None:
    if args.keep is not None and any(k < 1 for k in args.keep):
        raise SystemExit(f"zspaprune demo: --keep values must be >= 1, got {args.keep}")
    if not 0.0 <= args.ratio <= 1.0:
        raise SystemExit(f"zspaprune demo: --ratio must be in [0, 1], got {args.ratio}")
    if args.repeat < 1 or args.max_new_tokens < 1:
        raise SystemExit("zspaprune demo: --repeat and --max-new-tokens must be >= 1")
    for name in ("model", "image"):
        path = getattr(args, name)
        if path is not None and not Path(path).exists():
            raise SystemExit(f"zspaprune demo: --{name} {path} does not exist")
