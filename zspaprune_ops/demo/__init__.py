"""``zspaprune demo``: prune a VLM's visual tokens at a few budgets and show what each does.

With no arguments it runs offline on the embedded default: the small LLaVA trained on the shapes
world (``zspaprune_ops.world``; 256 visual tokens per 224 px image, weights shipped in
``zspaprune_ops/assets/shapes_llava``), asked a question of that world about a test-split scene,
so each budget's answer can be read against the unpruned answer and the ground truth.
``--model`` takes a local checkpoint folder of any supported family instead
(``zspaprune_ops.models.families()``; default image: the bundled sample picture).

For the unpruned model and each budget it measures what the budget changes (the language
model's sequence length and the memory its prefill adds: activations and KV cache), the greedy
answer, and the prefill time (median after a warm-up of every variant); it prints them
(``report``) and draws the kept patches, the question and each budget's answer
(``overlay``). Budgets that keep the image whole select nothing; they are named once, not given
rows of their own.
"""
import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from zspaprune_ops._validate import FEATURE_DTYPES
from zspaprune_ops.checkpoint import DEMO_PROMPT, SAMPLE_IMAGE, load_model, prompt_text
from zspaprune_ops.choice import Budget
from zspaprune_ops.errors import UsageError
from zspaprune_ops.models import family_names
from zspaprune_ops.rule import core_size
from zspaprune_ops.testing.measure import interleaved_medians, peak_bytes, resident_bytes

WORLD_SCENE = ("test", 15)
"""The default question: this (split, index) sample of the shapes world, a colour question of the
test split (``What color is the circle?``) that the shipped model answers right unpruned."""
WARMUP_ROUNDS = 2
"""Untimed rounds of every variant before the timed ones: first calls (allocator growth, lazy
weight pages, one-off initialisation) must not land in any variant's time."""


@dataclass
class BudgetResult:
    """One row of the demo: ``keep`` visual tokens per image (None: the unpruned model), from
    ``budget`` as given (an int count or a float share; None: unpruned)."""

    keep: Optional[int]
    sequence_length: int
    prefill_seconds: float
    lm_prefill_bytes: Optional[int]
    text: str
    kept: List[int] = field(default_factory=list)
    core: List[int] = field(default_factory=list)
    budget: Union[int, float, None] = None


@dataclass
class Prompt:
    """The question and how the model sees it: ``chat`` (the chat-formatted text), the tokens
    that form the relevance prompt (``tokens`` of them, spanning ``text``) under ``mode``
    (``"message"``: the user's words; ``"all"``: every text token, for a model without a chat
    template), and the question's words the tokenizer does not know (each becomes its unknown
    token)."""

    question: str
    chat: str
    text: str
    tokens: int
    mode: str
    unknown_words: List[str] = field(default_factory=list)
    known_words: List[str] = field(default_factory=list)
    """The tokenizer's whole vocabulary (special tokens aside) when it is a small word list
    (the shapes world's), to show with unknown words; else empty."""


@dataclass
class DemoResult:
    model_note: str
    prompt: Prompt
    image_tokens: int
    rows: List[BudgetResult]
    unselected: List[Union[int, float]]
    png: Optional[Path]
    grids_note: str
    lm_parameters: int
    truth: Optional[str] = None
    """The ground-truth answer (the shapes world's question), None where unknown."""


def default_inputs(args: argparse.Namespace):
    """(image, question, ground truth or None) of the run: the shapes world's scene and question
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


def split_budgets(budgets: Sequence[Union[int, float]], image_tokens: int
                  ) -> Tuple[List[Tuple[Union[int, float], int]], list]:
    """([(budget, tokens it keeps)] for the budgets that prune, [budgets that keep the image
    whole: no selection]), each kept count once, in the order given. A budget is an int
    (tokens) or a float share of ``image_tokens`` (``zspaprune_ops.choice.Budget``)."""
    pruning, whole, seen = [], [], set()
    for budget in budgets:
        keep = Budget(budget).count(image_tokens)
        if keep >= image_tokens:
            whole.append(budget)
        elif keep not in seen:
            seen.add(keep)
            pruning.append((budget, keep))
    return pruning, whole


SMALL_VOCABULARY = 200
"""A tokenizer with at most this many tokens is a word list worth showing in full."""


def known_words(tokenizer) -> List[str]:
    """The words of a small word-level vocabulary, special tokens aside; [] for a large one."""
    vocabulary = tokenizer.get_vocab()
    if len(vocabulary) > SMALL_VOCABULARY:
        return []
    special = set(tokenizer.all_special_tokens)
    return sorted(w for w in vocabulary if w not in special and w.isalpha())


def unknown_words(tokenizer, question: str) -> List[str]:
    """The words of ``question`` (split on spaces, end punctuation dropped) that ``tokenizer``
    turns into its unknown token; none for a tokenizer without one (byte-level BPE)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    words = [w.strip("?!.,;:\"'()") for w in question.split()]
    return [w for w in dict.fromkeys(words)
            if w and unk in tokenizer(w, add_special_tokens=False)["input_ids"]]


def relevance_prompt(processor, inputs: dict, image_token_id: int, question: str,
                     inserted: Optional[str] = None) -> Prompt:
    """The question as the wrapper sees it: which tokens form the relevance prompt
    (``inserted``: the family's regex of text its processor writes beside an image, never
    prompt: ``ZSPAPruneModel.inserted_text``)."""
    import re

    from zspaprune_ops.prompt import ChatLayout, prompt_positions

    layout = ChatLayout.of(processor)
    mode = "message" if layout is not None else "all"
    ids = inputs["input_ids"][0].tolist()
    first_image = ids.index(image_token_id)
    (positions,) = prompt_positions(ids, [first_image], [image_token_id], layout, mode,
                                    re.compile(inserted) if inserted else None)
    tokenizer = processor.tokenizer
    # the user's message as written: its prompt tokens and the blank ones between them
    text = tokenizer.decode(ids[positions[0]:positions[-1] + 1]) if positions else ""
    unknown = unknown_words(tokenizer, question)
    return Prompt(question, prompt_text(processor, question), text, len(positions), mode,
                  unknown, known_words(tokenizer) if unknown else [])


def run(model, processor, image, question: str, budgets, relevance_ratio: float,
        max_new_tokens: int, repeat: int, device: torch.device):
    """Measure the unpruned model and each budget that prunes the image; returns (image_tokens,
    prompt, rows, budgets that keep the image whole), the unpruned row first."""
    from zspaprune_ops import prune
    from zspaprune_ops.models import wrapper_class

    inputs = processor(images=image, text=prompt_text(processor, question), return_tensors="pt")
    dtype = model.get_input_embeddings().weight.dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
              for k, v in inputs.items()}
    input_length = inputs["input_ids"].shape[1]
    image_token_id = model.config.image_token_id
    image_tokens = int((inputs["input_ids"] == image_token_id).sum())
    prompt = relevance_prompt(processor, inputs, image_token_id, question,
                              wrapper_class(model).inserted_text)
    pruning, whole = split_budgets(budgets, image_tokens)
    options = dict(relevance_ratio=relevance_ratio, processor=processor, prompt=prompt.mode)
    # keep = image_tokens keeps the image whole: the unpruned model's language-model input
    keeps = [image_tokens] + [keep for _, keep in pruning]
    wrappers = [prune(model, keep=keep, **options) for keep in keeps]
    prefills = [lambda: model(**inputs, logits_to_keep=1)]
    prefills += [lambda w=w: w(**inputs, logits_to_keep=1) for w in wrappers[1:]]
    seconds = interleaved_medians(prefills, device, repeat, warmup=WARMUP_ROUNDS)
    generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    decode = processor.tokenizer.decode
    rows = []
    for (budget, keep), wrapped, time_s in zip([(None, None), *pruning], wrappers, seconds):
        with torch.inference_mode():
            pruned = wrapped.prune_inputs(**prune_arguments(wrapped, inputs))
        memory = lm_prefill_bytes(wrapped, pruned, device)
        generator = model if keep is None else wrapped  # both return prompt + new tokens
        with torch.inference_mode():
            new_tokens = generator.generate(**inputs, **generate_kwargs)[0, input_length:]
        text = decode(new_tokens, skip_special_tokens=True)
        if keep is None:
            rows.append(BudgetResult(None, input_length, time_s, memory, text))
            continue
        kept = [index for index in pruned.kept_indices[0].tolist() if index >= 0]
        core = relevance_core(model, inputs, keep, kept, options)
        rows.append(BudgetResult(keep, pruned.inputs_embeds.shape[1], time_s, memory, text,
                                 kept, core, budget))
    return image_tokens, prompt, rows, whole


def lm_prefill_bytes(wrapped, pruned, device: torch.device) -> Optional[int]:
    """Peak bytes the language model's prefill over ``pruned`` (of the wrapper ``wrapped``)
    adds to what was there before it: its activations and the KV cache it builds, the memory a
    budget shrinks (the vision tower's is the same at every budget). None where peak memory is
    not measured."""
    model = wrapped.model
    embeds, mask = pruned.inputs_embeds, pruned.attention_mask
    positions = pruned.position_ids

    def prefill():  # as the wrapper's forward runs it (Gemma 3: with its token_type_ids)
        with wrapped.language_inputs(pruned):
            return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         logits_to_keep=1, **pruned.forward_kwargs)

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


def language_model_parameters(model) -> int:
    """Parameters of the language model (decoder and output head, not the vision tower)."""
    decoder = model.get_decoder()
    return (sum(p.numel() for p in decoder.parameters())
            + sum(p.numel() for p in model.get_output_embeddings().parameters()))


def prune_arguments(wrapped, inputs: dict) -> dict:
    """The processor outputs ``wrapped.prune_inputs`` takes: ids, pixels, mask and the family's
    ``visual_inputs`` (OneVision's ``batch_num_images``, Gemma 3's ``token_type_ids``...)."""
    names = ("input_ids", "pixel_values", "attention_mask", *wrapped.visual_inputs)
    return {name: inputs[name] for name in names if name in inputs}


def relevance_core(model, inputs: dict, keep: int, kept: List[int], options: dict) -> List[int]:
    """The core of the selection: the op itself run at ``keep = n_core`` with ratio 1.

    ZSPAPrune's core is the first n_core of the relevance ranking whatever the fill does,
    so this is exactly the core inside ``kept`` (checked).
    """
    from zspaprune_ops import prune

    n_core = core_size(keep, options["relevance_ratio"])
    if n_core == 0:
        return []
    wrapped = prune(model, keep=n_core, **{**options, "relevance_ratio": 1.0})
    with torch.inference_mode():
        core = wrapped.prune_inputs(**prune_arguments(wrapped, inputs)).kept_indices[0].tolist()
    if not set(core) <= set(kept):
        raise RuntimeError(f"relevance core {core} is not inside the kept tokens {kept}")
    return core


def main(args: argparse.Namespace) -> DemoResult:
    """Run the demo for parsed ``args`` (see ``zspaprune demo --help``); prints the report,
    writes the overlay, returns the result. Raises UsageError for unusable arguments."""
    from PIL import UnidentifiedImageError

    from zspaprune_ops.demo.grids import token_grids
    from zspaprune_ops.demo.overlay import Budget as Panel
    from zspaprune_ops.demo.overlay import draw_overlay
    from zspaprune_ops.demo.report import answer_line, budget_label, report

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = FEATURE_DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    png = _output_path(args.out)
    try:
        image, question, truth = default_inputs(args)
        image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"--image {args.image}: not an image Pillow can read ({error})") from None
    torch.manual_seed(0)
    model, processor = load_model(args.model, device, dtype)
    if args.model is None:
        note = ("model: the shapes-world LLaVA shipped with zspaprune (a small LLaVA trained on "
                "synthetic scenes of coloured shapes; see docs/eval.md). Pass --model PATH for "
                f"a real {family_names()} checkpoint.")
    else:
        note = f"model: {args.model} ({type(model).__name__}, {dtype}, {device})"
    image_tokens, prompt, rows, whole = run(
        model, processor, image, question, args.keep, args.ratio, args.max_new_tokens,
        args.repeat, device)
    grid_thw = None
    if hasattr(model.config.vision_config, "spatial_merge_size"):  # Qwen: the resized grid
        grid_thw = processor.image_processor(images=image, return_tensors="pt")["image_grid_thw"][0]
    grids, grids_note = token_grids(model.config, processor.image_processor, image.size,
                                    image_tokens, grid_thw)
    panels = [Panel(budget_label(row, image_tokens), row.kept, row.core, answer_line(row, truth))
              for row in rows[1:]]
    header = [f"Q: {question}" + ("" if truth is None else f"   (ground truth: {truth})"),
              answer_line(rows[0], truth, prefix="unpruned")]
    if panels and grids:
        draw_overlay(image, grids, panels, header).save(png)
    result = DemoResult(note, prompt, image_tokens, rows, whole,
                        png if panels and grids else None, grids_note,
                        language_model_parameters(model), truth)
    print(report(result, args.ratio, device, args.repeat, WARMUP_ROUNDS))
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
