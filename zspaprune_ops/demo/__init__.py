"""``zspaprune demo``: prune a VLM's visual tokens at a few budgets and show the effect.

With no arguments it runs offline on the embedded default: the small LLaVA trained on the shapes
world (``zspaprune_ops.world``; 256 visual tokens per 224 px image, weights shipped in
``zspaprune_ops/assets/shapes_llava``), asked a question of that world about a test-split scene,
so each budget's answer can be read against the unpruned answer and the ground truth.
``--model`` takes a local LLaVA, LLaVA-NeXT, Qwen2.5-VL or Qwen3-VL checkpoint folder instead
(default image: the bundled sample picture).

It prints the prompt, then for each budget the tokens kept, the prefill time (median after a
warm-up of every variant; the unpruned model runs vision tower + LLM prefill, the pruned one
vision tower + selection + LLM prefill), the memory the language model's prefill adds
(activations and KV cache: what the budget shrinks) and the greedy generation, and writes an
image of the kept patches. Budgets at or above the image's token count select nothing; they are
named once, not given rows of their own.
"""
import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from zspaprune_ops._validate import FEATURE_DTYPES
from zspaprune_ops.checkpoint import DEMO_PROMPT, SAMPLE_IMAGE, load_model, prompt_text
from zspaprune_ops.errors import UsageError
from zspaprune_ops.eval.data import normalize
from zspaprune_ops.testing.measure import interleaved_medians, peak_bytes, resident_bytes
from zspaprune_ops.rule import core_size

DEFAULT_FRACTIONS = (1 / 2, 1 / 4, 1 / 9, 1 / 20)  # of 256 image tokens: keep 128, 64, 28, 13
WORLD_SCENE = ("test", 15)
"""The default question: this (split, index) sample of the shapes world, a colour question of the
test split (``What color is the circle?``) that the shipped model answers right unpruned."""


def default_inputs(args: argparse.Namespace):
    """(image, prompt, ground truth or None) of the run: the shapes world's scene and question
    for the default model (each replaced by ``--image`` / ``--prompt`` when given); the bundled
    sample picture and ``DEMO_PROMPT`` for ``--model``."""
    from PIL import Image

    from zspaprune_ops.world import scenes

    if args.model is None:
        scene = scenes.sample(*WORLD_SCENE)
        image = scene.image if args.image is None else Image.open(args.image)
        truth = scene.answer if args.image is None and args.prompt is None else None
        return image, args.prompt or scene.question, truth
    return Image.open(args.image or SAMPLE_IMAGE), args.prompt or DEMO_PROMPT, None


WARMUP_ROUNDS = 2
"""Untimed rounds of every variant before the timed ones: first calls (allocator growth, lazy
weight pages, one-off initialisation) must not land in any variant's time."""


@dataclass
class BudgetResult:
    """One row of the demo: ``keep`` visual tokens per image (None: the unpruned model)."""

    keep: Optional[int]
    sequence_length: int
    prefill_seconds: float
    lm_prefill_bytes: Optional[int]
    text: str
    kept: List[int] = field(default_factory=list)
    core: List[int] = field(default_factory=list)


@dataclass
class DemoResult:
    model_note: str
    prompt: str
    chat_prompt: str
    prompt_tokens: int
    image_tokens: int
    rows: List[BudgetResult]
    unselected: List[int]
    png: Optional[Path]
    grids_note: str
    truth: Optional[str] = None
    """The ground-truth answer (the shapes world's question), None where unknown."""


def split_budgets(keeps: Optional[Sequence[int]], image_tokens: int) -> Tuple[list, list]:
    """(budgets below ``image_tokens``, budgets at or above it: no selection), each once, in the
    order given; ``keeps`` None means ``DEFAULT_FRACTIONS`` of the image's tokens."""
    keeps = keeps or [max(1, round(image_tokens * f)) for f in DEFAULT_FRACTIONS]
    keeps = list(dict.fromkeys(keeps))
    return [k for k in keeps if k < image_tokens], [k for k in keeps if k >= image_tokens]


def run(model, processor, image, prompt: str, keeps, relevance_ratio: float,
        max_new_tokens: int, repeat: int, device: torch.device):
    """Measure the unpruned model and each budget in ``keeps`` below the image's token count;
    returns (image_tokens, prompt_tokens, rows, unselected budgets), the unpruned row first."""
    from zspaprune_ops import prune

    inputs = processor(images=image, text=prompt_text(processor, prompt), return_tensors="pt")
    dtype = model.get_input_embeddings().weight.dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
              for k, v in inputs.items()}
    input_length = inputs["input_ids"].shape[1]
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    keeps, unselected = split_budgets(keeps, image_tokens)
    # keep = image_tokens keeps the image whole: the unpruned model's language-model input
    wrappers = [prune(model, keep=keep, relevance_ratio=relevance_ratio)
                for keep in [image_tokens, *keeps]]
    prefills = [lambda: model(**inputs, logits_to_keep=1)]
    prefills += [lambda w=w: w(**inputs, logits_to_keep=1) for w in wrappers[1:]]
    seconds = interleaved_medians(prefills, device, repeat, warmup=WARMUP_ROUNDS)
    generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    decode = processor.tokenizer.decode
    rows = []
    for keep, wrapped, time_s in zip([None, *keeps], wrappers, seconds):
        with torch.inference_mode():
            pruned = wrapped.prune_inputs(**_prune_arguments(inputs))
        memory = lm_prefill_bytes(model, pruned, device)
        if keep is None:  # the stock model's own generation (it returns the prompt too)
            new_tokens = model.generate(**inputs, **generate_kwargs)[0, input_length:]
            rows.append(BudgetResult(None, input_length, time_s, memory,
                                     decode(new_tokens, skip_special_tokens=True)))
            continue
        new_tokens = wrapped.generate(**inputs, **generate_kwargs)[0, input_length:]
        kept = [index for index in pruned.kept_indices[0].tolist() if index >= 0]
        core = relevance_core(model, inputs, keep, relevance_ratio, kept)
        rows.append(BudgetResult(keep, pruned.inputs_embeds.shape[1], time_s, memory,
                                 decode(new_tokens, skip_special_tokens=True), kept, core))
    return image_tokens, input_length - image_tokens, rows, unselected


def lm_prefill_bytes(model, pruned, device: torch.device) -> Optional[int]:
    """Peak bytes the language model's prefill over ``pruned`` adds to what was there before it:
    its activations and the KV cache it builds, the memory a budget shrinks (the vision tower's
    is the same at every budget). None where peak memory is not measured."""
    embeds, mask = pruned.inputs_embeds, pruned.attention_mask
    positions = pruned.position_ids

    def prefill():
        return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                     logits_to_keep=1)

    peak = peak_bytes(prefill, device)
    if peak is None:
        return None
    # what the call reads (on CPU the peak counts only tensors a run touches): the decoder
    # without its token-embedding table (it gets inputs_embeds), the output head, the inputs
    decoder, embedding = model.get_decoder(), model.get_input_embeddings().weight
    read = [p for p in decoder.parameters() if p is not embedding]
    read += [*decoder.buffers(), *model.get_output_embeddings().parameters(),
             embeds, mask, positions]
    return peak - resident_bytes(read, device)


def _prune_arguments(inputs: dict) -> dict:
    names = ("input_ids", "pixel_values", "attention_mask", "image_sizes", "image_grid_thw",
             "mm_token_type_ids")
    return {name: inputs[name] for name in names if name in inputs}


def relevance_core(model, inputs: dict, keep: int, relevance_ratio: float,
                   kept: List[int]) -> List[int]:
    """The core of the selection: the op itself run at ``keep = n_core`` with ratio 1.

    ZSPAPrune's core is the first n_core of the relevance ranking whatever the fill does,
    so this is exactly the core inside ``kept`` (checked).
    """
    from zspaprune_ops import prune

    n_core = core_size(keep, relevance_ratio)
    if n_core == 0:
        return []
    with torch.inference_mode():
        core = prune(model, keep=n_core, relevance_ratio=1.0).prune_inputs(
            **_prune_arguments(inputs)).kept_indices[0].tolist()
    if not set(core) <= set(kept):
        raise RuntimeError(f"relevance core {core} is not inside the kept tokens {kept}")
    return core


def report(result: DemoResult, relevance_ratio: float, device: torch.device, repeat: int) -> str:
    """The printed text: the prompt, then one line per budget, the unpruned model first."""
    lines = [result.model_note,
             f"prompt: {result.prompt!r}, chat-formatted: {result.chat_prompt!r}",
             f"  the relevance core ranks image tokens by cosine to the mean of the prompt's "
             f"{result.prompt_tokens} text tokens (chat template included)",
             f"{result.image_tokens} visual tokens per image; relevance_ratio {relevance_ratio}; "
             f"prefill = forward over the whole prompt, median of {repeat} run(s) on {device} "
             f"after {WARMUP_ROUNDS} untimed round(s) of every variant",
             "(pruned rows include the selection: vision tower + selection + LLM prefill; "
             "unpruned: vision tower + LLM prefill)"]
    if result.truth is not None:
        lines.append(f"ground truth: {result.truth!r} (each answer below is marked right or "
                     "wrong against it)")
    if result.unselected:
        budgets = ", ".join(map(str, result.unselected))
        lines.append(f"keep {budgets} >= {result.image_tokens} tokens: no selection (the image "
                     "is kept whole, as in the unpruned row)")
    lines += ["", f"{'keep':>6} {'seq len':>7} {'core':>5} {'fill':>5} {'prefill ms':>10} "
                  f"{'vs unpruned':>11} {'LM MiB':>8} {'vs unpruned':>11}  generated text"]
    base = result.rows[0]
    widths = (6, 7, 5, 5, 10, 11, 8, 11)
    for row in result.rows:
        pruned = row.keep is not None
        cells = ["all" if row.keep is None else row.keep, row.sequence_length,
                 len(row.core) if pruned else "-", len(row.kept) - len(row.core) if pruned else "-",
                 f"{row.prefill_seconds * 1e3:.2f}",
                 _ratio(base.prefill_seconds, row.prefill_seconds),
                 _mib(row.lm_prefill_bytes), _ratio(row.lm_prefill_bytes, base.lm_prefill_bytes)]
        verdict = "" if result.truth is None else (
            " right" if normalize(row.text) == normalize(result.truth) else " wrong")
        lines.append(" ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths))
                     + f"  {row.text!r}{verdict}")
    profiler = "" if device.type == "cuda" else "; on CPU from the torch profiler's timeline"
    lines += ["", "vs unpruned: prefill speed-up (unpruned time / this time) and LM memory ratio "
                  "(this / unpruned).",
              "LM MiB: peak memory of the language model's prefill above what was allocated "
              "before it, i.e. its activations and KV cache, the memory the budget shrinks (the "
              f"vision tower's is the same at every budget and is not counted{profiler})."]
    if result.png is None:
        lines.append("no overlay: no budget below the image's token count")
    else:
        lines.append(f"overlay of the kept patches: {result.png}")
        if result.grids_note:
            lines.append(f"  ({result.grids_note})")
    return "\n".join(lines)


def _mib(size: Optional[int]) -> str:
    return "n/a" if size is None else f"{size / 2**20:.1f}"


def _ratio(numerator, denominator) -> str:
    return "n/a" if numerator is None or not denominator else f"{numerator / denominator:.2f}x"


def main(args: argparse.Namespace) -> DemoResult:
    """Run the demo for parsed ``args`` (see ``zspaprune demo --help``); prints the report,
    writes the overlay, returns the result. Raises UsageError for unusable arguments."""
    from PIL import UnidentifiedImageError

    from zspaprune_ops.demo.overlay import Budget, draw_overlay, token_grids

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = FEATURE_DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    png = _output_path(args.out)
    try:
        image, prompt, truth = default_inputs(args)
        image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"--image {args.image}: not an image Pillow can read ({error})") from None
    torch.manual_seed(0)
    model, processor = load_model(args.model, device, dtype)
    if args.model is None:
        note = ("model: the shapes-world LLaVA shipped with zspaprune (a small LLaVA trained on "
                "synthetic scenes of coloured shapes; see README, `zspaprune eval`). "
                "Pass --model PATH for a real LLaVA, LLaVA-NeXT, Qwen2.5-VL or Qwen3-VL "
                "checkpoint.")
    else:
        note = f"model: {args.model} ({type(model).__name__}, {dtype}, {device})"
    image_tokens, prompt_tokens, rows, unselected = run(
        model, processor, image, prompt, args.keep, args.ratio, args.max_new_tokens,
        args.repeat, device)
    grid_thw = None
    if hasattr(model.config.vision_config, "spatial_merge_size"):  # Qwen: the resized grid
        grid_thw = processor.image_processor(images=image, return_tensors="pt")["image_grid_thw"][0]
    grids, grids_note = token_grids(model.config, processor.image_processor, image.size,
                                    image_tokens, grid_thw)
    budgets = [Budget(f"keep {row.keep} (core {len(row.core)}, fill "
                      f"{len(row.kept) - len(row.core)})", row.kept, row.core)
               for row in rows[1:]]
    if budgets:
        draw_overlay(image, grids, budgets).save(png)
    result = DemoResult(note, prompt, prompt_text(processor, prompt), prompt_tokens,
                        image_tokens, rows, unselected, png if budgets else None, grids_note,
                        truth)
    print(report(result, args.ratio, device, args.repeat))
    return result


def _output_path(out: str) -> Path:
    """``--out`` checked before any work: a format Pillow writes, in a folder that can exist."""
    from PIL import Image

    png = Path(out)
    if Image.registered_extensions().get(png.suffix.lower()) not in Image.SAVE or png.is_dir():
        raise UsageError(f"--out {out}: give an image file name, e.g. kept.png")
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create its folder ({error})") from None
    return png
