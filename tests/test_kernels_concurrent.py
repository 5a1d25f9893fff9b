"""The streaming launch 2 with several programs per image, run for real on the CPU.

Triton's interpreter runs the programs of a grid one after another, so a grid-wide barrier never
completes there. ``zspaprune_ops.testing.interpreter.concurrent_grids`` runs them as threads,
with an adversarial schedule (random sleeps at every arrival and poll): the cooperative launch
then runs to completion with P = 2, 3, 5 and 8 programs per image, and its picks must equal one
program per image bit for bit, Gram mode (up to copies of a token) and the float64 rule. A
kernel with one barrier wait or the lists' double buffering removed must fail these checks.
"""
import importlib
import shutil
import sys

import pytest
import torch

from literal import replay
from test_kernels import DEVICE, multipick_tokens
from zspaprune_ops import kernels
from zspaprune_ops.kernels import fill
from zspaprune_ops.kernels import select as module

pytestmark = pytest.mark.skipif(DEVICE == "cuda", reason="Triton's interpreter only")

N, D, KEEP = 72, 8, 18
JITTER, MUTANT_JITTER = 0.001, 0.2
"""Longest sleep (seconds) around an atomic operation or store of the slowest program: small
for the kernel (its runs must pass under any schedule), large for the mutants (the slow programs
lag a whole pass behind the first, which is the fastest)."""


def concurrent(seed, jitter=JITTER):
    from zspaprune_ops.testing.interpreter import concurrent_grids
    return concurrent_grids(jitter=jitter, seed=seed)


def inputs(kind, seed):
    """visual [2, N, D], prompt [2, 3, D] and masks: two images of one kind; ``masked``: random
    tokens, a third of them padded, and image 0 without a real prompt token."""
    g = torch.Generator().manual_seed(seed)
    if kind == "masked":
        visual = torch.randn(2, N, D, generator=g)
        visual_mask = torch.rand(2, N, generator=g) < 0.7
        visual_mask[:, :KEEP] = True
        prompt_mask = torch.tensor([[False] * 3, [True, False, True]])
    else:
        visual = torch.cat([multipick_tokens(kind, N, D, g) for _ in range(2)])
        prompt_mask = visual_mask = None
    return visual, torch.randn(2, 3, D, generator=g), prompt_mask, visual_mask


def run(select, visual, prompt, ratio, prompt_mask, visual_mask, parts):
    """Streaming picks with ``parts`` programs per image and the barrier word of each image."""
    words = []
    launch = select._launch_stream

    def recorded(args, *rest):
        used = launch(args, *rest)
        words.append(args[8][:, 0].clone())
        return used

    select._launch_stream = recorded  # the module under test may be a mutant copy
    try:
        kept = select.select_batched(visual, prompt, KEEP, ratio, prompt_mask, visual_mask,
                                     gram=False, parts=parts)
    finally:
        select._launch_stream = launch
    return kept, words[0]


def same_tokens_up_to_copies(visual, a, b):
    copy_of = {}
    token = [copy_of.setdefault(tuple(row.tolist()), len(copy_of)) for row in visual]
    return sorted(token[i] for i in a.tolist()) == sorted(token[i] for i in b.tolist())


@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates", "masked"])
@pytest.mark.parametrize("parts", [2, 3, 5, 8])
def test_cooperative_launch_completes_and_equals_the_rule(parts, kind):
    """Every image's P programs pass every barrier (the word counts P arrivals per pass and
    the last barrier, no failure bit), and the picks equal one program per image exactly, Gram
    mode's and the float64 rule's, at ratio 0, 0.5 and 1. P = 5 and 8 leave programs with
    an empty slice (N = 72: slices of 32 tokens)."""
    visual, prompt, prompt_mask, visual_mask = inputs(kind, parts * 7 + len(kind))
    for ratio in (0.0, 0.5, 1.0):
        alone, alone_word = run(module, visual, prompt, ratio, prompt_mask, visual_mask, 1)
        with concurrent(seed=parts):
            kept, word = run(module, visual, prompt, ratio, prompt_mask, visual_mask, parts)
        assert torch.equal(kept, alone), (ratio, kept, alone)
        assert torch.equal(word & fill._FAILED.value, torch.zeros_like(word))
        assert torch.equal(word, alone_word * parts)  # as many barriers as one program's
        gram = module.select_batched(visual, prompt, KEEP, ratio, prompt_mask, visual_mask,
                                     gram=True)
        for b in range(2):
            masks = [None if m is None else m[b] for m in (prompt_mask, visual_mask)]
            replay(visual[b], prompt[b], KEEP, ratio, kept[b], *masks, tol=1e-12)
            if kind == "duplicates":  # Gram mode's BLAS matmul may take another copy
                assert same_tokens_up_to_copies(visual[b], kept[b], gram[b])
            else:
                assert torch.equal(kept[b], gram[b])


MUTANTS = {  # name -> (text of kernels/fill.py, its replacement, occurrence replaced)
    "no-wait-in-a-pass": ("ok = _grid_wait(sync, P, phase, ok, wait_us, INTERPRETED)",
                          'tl.atomic_add(sync, 1, sem="acq_rel", scope="gpu")', 0),
    "no-wait-before-the-row": ("ok = _grid_wait(sync, P, phase, ok, wait_us, INTERPRETED)",
                               'tl.atomic_add(sync, 1, sem="acq_rel", scope="gpu")', 1),
    "one-lists-buffer": ("(phase % 2) * P * 2 * CAND", "0 * P * 2 * CAND", 0),
}


def mutant(tmp_path, name):
    """A copy of the kernels package with one change to its launch 2, imported on its own."""
    old, new, occurrence = MUTANTS[name]
    package = f"zspaprune_mutant_{name.replace('-', '_')}"
    folder = tmp_path / package
    shutil.copytree(kernels.__path__[0], folder, ignore=shutil.ignore_patterns("__pycache__"))
    text = (folder / "fill.py").read_text()
    pieces = text.split(old)
    assert len(pieces) >= occurrence + 2, f"{old!r} not found in kernels/fill.py"
    text = old.join(pieces[:occurrence + 1]) + new + old.join(pieces[occurrence + 1:])
    (folder / "fill.py").write_text(text)
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(f"{package}.select")
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize("name", ["none", *MUTANTS])
def test_a_kernel_without_one_wait_or_buffer_swap_fails(name, tmp_path, monkeypatch):
    """The checks above catch a missing barrier wait or a reused lists buffer: under a schedule
    where the first program is the fastest and the others lag by up to MUTANT_JITTER at every
    atomic, store and volatile load, each mutant gives some image a pick that differs from one
    program per image, or fails the image. The kernel itself ("none") passes that schedule."""
    select = module if name == "none" else mutant(tmp_path, name)
    # polls count 0.1 ms each: the fastest program polls without sleeping while the slowest
    # sleeps at every store; a mutant may wait for arrivals that never come
    monkeypatch.setattr(select, "BARRIER_TIMEOUT_S", 5.0)
    cases = [("random", 3), ("clustered", 5), ("masked", 8)]
    caught = []
    for seed, (kind, parts) in enumerate(cases[:1] if name == "none" else cases):
        visual, prompt, prompt_mask, visual_mask = inputs(kind, seed)
        alone, _ = run(module, visual, prompt, 0.5, prompt_mask, visual_mask, 1)
        try:
            with concurrent(seed=0, jitter=MUTANT_JITTER):
                kept, _ = run(select, visual, prompt, 0.5, prompt_mask, visual_mask, parts)
        except RuntimeError:  # a failed image: caught too
            caught.append(kind)
            break
        if not torch.equal(kept, alone):
            caught.append(kind)
            break
    if name == "none":
        assert not caught
    else:
        assert caught, f"the mutant {name} passed every check"
