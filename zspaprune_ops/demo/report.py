"""The demo's printed report and the labels of its overlay.

What a budget does comes first (the language model's sequence length and prefill memory, the
answer), timings after, with why a tiny model's times cannot show a speed-up.
"""
from typing import Optional

from zspaprune_ops.eval.data import normalize

SMALL_LANGUAGE_MODEL = 100_000_000
"""Below this many parameters a language model's prefill costs about what the vision tower and
the selection cost, so the demo's prefill times cannot show what pruning saves at scale."""
TIMINGS_ELSEWHERE = ("bench/RESULTS.md (e2e_prefill: a LLaVA-shaped model's prefill against "
                     "the unpruned one; measure yours with python bench/bench_e2e.py)")


def verdict(text: str, truth: Optional[str]) -> str:
    """" right" / " wrong" against the ground truth, "" without one."""
    if truth is None:
        return ""
    return " right" if normalize(text) == normalize(truth) else " wrong"


def share(keep: Optional[int], image_tokens: int) -> str:
    return "100%" if keep is None else f"{100 * keep / image_tokens:.0f}%"


def budget_label(row, image_tokens: int) -> str:
    """A panel's title: tokens kept, their share, core + fill."""
    return (f"keep {row.keep} ({share(row.keep, image_tokens)}): core {len(row.core)} + fill "
            f"{len(row.kept) - len(row.core)}")


def answer_line(row, truth: Optional[str], prefix: str = "answer") -> str:
    return f"{prefix}: {row.text.strip()!r}{verdict(row.text, truth)}"


def report(result, relevance_ratio: float, device, repeat: int, warmup: int) -> str:
    """The printed text: the question and its relevance prompt, what each budget does (one row
    per budget, the unpruned model first), then the prefill times and what they can show."""
    prompt, base = result.prompt, result.rows[0]
    lines = [result.model_note, f"question: {prompt.question!r}"
             + ("" if result.truth is None else f"   ground truth: {result.truth!r}")]
    if prompt.unknown_words:
        words = ", ".join(map(repr, prompt.unknown_words))
        known = prompt.known_words
        lines.append(f"warning: the model's tokenizer does not know {words}: each becomes its "
                     "unknown token, so the model cannot read it"
                     + (f"; it knows: {' '.join(known)}" if known else ""))
    if prompt.mode == "message":
        lines.append(f"relevance prompt: the user's words, {prompt.text!r} ({prompt.tokens} "
                     "tokens; no system prompt or template text)")
    else:
        lines.append(f"relevance prompt: every text token of the chat-formatted prompt "
                     f"({prompt.tokens} tokens: this model has no chat template to find the "
                     "user's words in)")
    lines += [f"chat-formatted: {prompt.chat!r}",
              f"{result.image_tokens} visual tokens per image; relevance_ratio "
              f"{relevance_ratio}"]
    if result.unselected:
        budgets = ", ".join(map(str, result.unselected))
        lines.append(f"keep {budgets}: the whole image ({result.image_tokens} tokens), no "
                     "selection, as in the unpruned row")
    lines += ["", "What a budget does: the language model reads `seq len` tokens and keeps "
                  "their KV cache; fewer visual tokens, a shorter sequence, less memory.",
              f"{'keep':>6} {'share':>5} {'seq len':>7} {'LM MiB':>7} {'vs all':>7} "
              f"{'core':>5} {'fill':>5}  answer"]
    for row in result.rows:
        pruned = row.keep is not None
        cells = [row.keep if pruned else "all", share(row.keep, result.image_tokens),
                 row.sequence_length, _mib(row.lm_prefill_bytes),
                 _ratio(row.lm_prefill_bytes, base.lm_prefill_bytes),
                 len(row.core) if pruned else "-",
                 len(row.kept) - len(row.core) if pruned else "-"]
        widths = (6, 5, 7, 7, 7, 5, 5)
        lines.append(" ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths))
                     + f"  {row.text!r}{verdict(row.text, result.truth)}")
    profiler = "" if device.type == "cuda" else "; on CPU from the torch profiler's timeline"
    lines += ["LM MiB: peak memory of the language model's prefill above what was allocated "
              "before it (its activations and KV cache; the vision tower's, the same at every "
              f"budget, is not counted{profiler}); vs all: this / unpruned.", ""]
    lines += timing_lines(result, device, repeat, warmup)
    if result.png is None:
        lines.append("no overlay: no budget prunes the image, or its token grid is unknown")
    else:
        lines.append(f"overlay: {result.png} (the kept patches, the question and each budget's "
                     "answer)")
        if result.grids_note:
            lines.append(f"  ({result.grids_note})")
    return "\n".join(lines)


def timing_lines(result, device, repeat: int, warmup: int) -> list:
    """The prefill times in one line, and what they can and cannot show."""
    base = result.rows[0]
    times = [f"all {base.prefill_seconds * 1e3:.1f}"]
    times += [f"{row.keep} {row.prefill_seconds * 1e3:.1f} "
              f"({_ratio(base.prefill_seconds, row.prefill_seconds)})" for row in result.rows[1:]]
    lines = [f"prefill ms (median of {repeat} after {warmup} untimed rounds of every variant; "
             f"pruned: vision tower + "
             f"selection + LM prefill; speed-up vs unpruned in brackets): " + ", ".join(times)]
    millions = result.lm_parameters / 1e6
    if result.lm_parameters < SMALL_LANGUAGE_MODEL:
        lines.append(f"  These times cannot show what pruning saves: this language model has "
                     f"{millions:.1f}M parameters, so its prefill costs about what the vision "
                     "tower and the selection cost (and the times swing with the machine's "
                     "load). Pruning pays where the language model dominates (billions of "
                     f"parameters, hundreds of visual tokens): see {TIMINGS_ELSEWHERE}.")
    else:
        lines.append(f"  ({millions:,.0f}M-parameter language model on {device}; one run, "
                     f"one image: more rows in {TIMINGS_ELSEWHERE})")
    return lines


def _mib(size: Optional[int]) -> str:
    return "n/a" if size is None else f"{size / 2**20:.1f}"


def _ratio(numerator, denominator) -> str:
    return "n/a" if numerator is None or not denominator else f"{numerator / denominator:.2f}x"
