"""The fused selection's host side: sizing, scratch buffers and the three launches.

Launch 0 (``prepare._prompt_kernel``) sums the real prompt tokens once per image. Launch 1
(``prepare._prepare_kernel``, fully parallel over B x row tiles x jobs) computes per-token
partial sums (squared norms, dots with the prompt sum) over feature splits and, where needed,
Gram tiles (stored for moderate N) or each token's nearest-other cosine (DivPrune's first pick).
Launch 2 (``fill``) runs core top-k and the farthest-point fill per image: over Gram rows with
all keys in registers (``_select_gram_kernel``) or, without the N x N scratch, computing the
chosen token's cosines from the features (``_select_stream_kernel``, keys in an O(B·N) scratch,
each image spread over the programs of a cooperative grid that meet at a grid-wide barrier
once per pass, several picks per pass).
No host-device sync (but the failure check below), no Python loop over keep: CUDA-graph
capturable. See kernels/README.md.
"""
import contextlib
import functools
import warnings

import torch
import triton

from zspaprune_ops.rule import core_size, may_start_with_divprune

from .fill import _FAILED, _LISTS_AT, _select_gram_kernel, _select_stream_kernel
from .prepare import _prepare_kernel, _prompt_kernel

TILE = 64
"""Rows and columns of a launch-1 tile (a 64x64 float32 accumulator). 128 x 128 tiles would halve
the L2 re-reads of large N, but spill registers with triton 3.6 on sm_90 (the GPU machine's) in
one variant and leave most SMs idle at N = 576 (15 tiles)."""
PREPARE_WARPS = 8
"""Warps of launch 1: with 4, the 64x64 tiles spill (see ``python -m zspaprune_ops.kernels.aot``)."""


def prepare_stages(dtype: torch.dtype) -> int:
    """Software-pipeline depth of launch 1's feature loop: float32 tiles are multiplied on CUDA
    cores (FMA-bound: little load latency to hide), and pipelining them spills registers in
    the streaming nearest-neighbour pass (16-24 bytes with triton 3.6); 16-bit tiles keep
    Triton's default, 3."""
    return 1 if dtype == torch.float32 else 3
PROMPT_BLOCK_D, PROMPT_BLOCK_T, PROMPT_WARPS = 32, 256, 8
"""Launch 0 tile: features x prompt rows per load (T = 2900 takes 12 dependent loads)."""


def tile_k(dtype: torch.dtype) -> int:
    """Feature chunk of launch 1: float32 products are not on tensor cores, so a smaller chunk
    keeps their tiles in registers (32 spills on sm_80 with the nearest-neighbour pass)."""
    return 16 if dtype == torch.float32 else 64


SPLIT_FEATURES, MAX_SPLITS = 512, 16
"""Launch 1 splits the row statistics over the features (partial sums, added by launch 2)."""
GRAM_MAX_N = 4096
"""Largest N that uses the Gram scratch (its launch 2 keeps the keys in registers)."""
GRAM_MAX_BYTES = 1 << 30
"""Bound on the [chunk, N, N] float32 Gram scratch: a larger batch runs in chunks of images."""
NEAREST_GROUP_COLS = 2048
"""Streaming mode: columns one launch-1 program scans for the DivPrune nearest neighbour."""
CORE_ROWS = 4
"""Gram rows of relevance-core picks loaded at once by the Gram-mode launch 2 (they do not
depend on each other: ROWS loads in flight instead of one dependent load per core pick)."""
REGISTER_BLOCKS = ((256, 1), (1024, 2), (4096, 8))
"""(block, num_warps) buckets of the Gram-mode launch 2: the block holds all N keys. Few warps:
each step's argmax is then mostly warp shuffles (latency-bound loop); 4096 needs 8 to not spill."""
STREAM_BLOCK_N, STREAM_WARPS = 32, 8
"""Streaming-mode launch 2: tokens per block of a pass over the features, and warps per program.
With 4 warps the 16-bit variants spill 8-12 bytes at 255 registers (triton 3.6, sm_80 and sm_90)
and float32 spills on sm_90; 8 warps hold the same warps per SM in half the programs."""
STREAM_CANDIDATES = 16
"""Candidates per pass of the streaming launch 2: their distances to every token come from one
pass over the features (a [32, D] x [D, 16] tensor-core product per token block), and every
pick the one-at-a-time rule makes among them is confirmed in that pass (core picks: 16 per
pass; fill picks: ``bench/multipick_sim.py`` counts 3-13 per pass for N = 576-32768)."""
SCRATCH_ALIGN = 32
"""float32 elements: every scratch view starts on a 128-byte boundary (a cache line)."""
LIST_CHUNK = 32
"""Programs' candidate lists merged per load (32 x 32 packed keys)."""


def candidate_k(dtype: torch.dtype) -> int:
    """Feature chunk of the streaming pass's product: float32 is multiplied on CUDA cores as a
    [32, 16, K] broadcast product (K = 16 spills no register with triton 3.6 or 3.9; K = 8
    spills on sm_80 with 3.6, by ptxas' choice)."""
    return 16 if dtype == torch.float32 else 128


MAX_PARTS = 256
"""Most programs per image in the cooperative streaming launch 2."""
SYNC_WORDS = _LISTS_AT.value + 2 * MAX_PARTS * 2 * STREAM_CANDIDATES
"""int64 words per image of the streaming launch 2: its barrier word alone on a 128-byte line
(the lists that programs store do not share the line every program polls), then two lists
buffers; a multiple of 16, so each image's barrier starts a line."""
COOPERATIVE = True
"""Spread each image of the streaming launch 2 over the programs of a cooperative grid on
CUDA; False gives one program per image (what the interpreter runs)."""
BARRIER_TIMEOUT_S = 10.0
"""Longest wait of a program at a grid-wide barrier of the streaming launch 2 (GPU time, from
the first poll) before its image is marked failed. A correct run waits microseconds; seconds
leave room for time-slicing, preemption, MPS sharing and compute-sanitizer. Under Triton's
interpreter each poll counts as 0.1 ms."""
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
"""Compile options of every launch: no FMA contraction, so picks do not depend on Triton's
default (which changes in 3.10)."""


def warmup(device, dtype: torch.dtype, features: int, *, masks=(False, True)) -> int:
    """Compile every kernel variant that calls with ``dtype`` features of size ``features``
    (D) can launch on ``device``, by running each on tiny inputs: afterwards no N, keep, T,
    batch or relevance ratio compiles anything (integer arguments other than D and the
    feature strides are not specialized, scratch views are aligned, unaligned inputs are
    copied). ``masks``: which mask presences to cover. Returns the calls made.

    The variants (``python -m zspaprune_ops.kernels.aot`` compiles the same list ahead of
    time): launch 0 with and without a prompt mask; launch 1 with and without a visual mask,
    Gram scratch or not, DivPrune's nearest-neighbour pass or not; the Gram-mode launch 2 per
    ``REGISTER_BLOCKS`` bucket, with and without that pass; the streaming launch 2 with one
    program per image or a cooperative grid, with and without that pass. A prompt of another
    dtype than the features, or a D that is not a multiple of 16, compiles its own."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    shapes = [(8, True, None)] + [(block + 1, True, None) for block, _ in REGISTER_BLOCKS[:-1]]
    shapes.append((2 * STREAM_BLOCK_N + 3, False, 1))
    if device.type == "cuda" and COOPERATIVE:
        shapes.append((2 * STREAM_BLOCK_N + 3, False, 2))
    calls = 0
    for vmask in masks:
        for pmask, ratio in ((False, 0.5), (False, 0.0), (True, 0.5)):
            if pmask and True not in masks:
                continue
            for n, gram, parts in shapes:
                visual = torch.randn(1, n, features, generator=g).to(device, dtype)
                prompt = torch.randn(1, 3, features, generator=g).to(device, dtype)
                pm = torch.ones(1, 3, dtype=torch.bool, device=device) if pmask else None
                vm = torch.ones(1, n, dtype=torch.bool, device=device) if vmask else None
                select_batched(visual, prompt, 4, ratio, pm, vm, gram=gram, parts=parts)
                calls += 1
    return calls


def uses_gram(n: int) -> bool:
    """Whether launch 2 walks a float32 Gram scratch (moderate N; the batch is chunked)."""
    return n <= GRAM_MAX_N


def gram_chunk(batch: int, n: int) -> int:
    """Images per launch sequence in Gram mode: the [chunk, N, N] scratch stays under
    GRAM_MAX_BYTES (a larger batch runs in several chunks instead of switching to streaming)."""
    return max(1, min(batch, GRAM_MAX_BYTES // (n * n * 4)))


def stream_parts(batch: int, n: int, device: torch.device, per_sm: int = 1) -> int:
    """Programs per image of the streaming launch 2: the B * parts programs form a cooperative
    grid, so they must fit on the GPU at once: ``per_sm`` programs per SM (the compiled
    kernel's occupancy) times the SM count. 1 off CUDA (Triton's interpreter runs programs one
    after another) or with ``COOPERATIVE`` off."""
    if not COOPERATIVE or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_PARTS, sms, sms * per_sm // batch, triton.cdiv(n, STREAM_BLOCK_N)))


def register_block(n: int):
    """(BLOCK, num_warps) of the Gram-mode launch 2 for N tokens."""
    return next((block, warps) for block, warps in REGISTER_BLOCKS if n <= block)


def select_batched(visual, prompt, keep, relevance_ratio, prompt_mask=None, visual_mask=None,
                   *, gram=None, parts=None):
    """The selection on checked batched inputs, in three kernel launches (per chunk of images
    in Gram mode); same contract as ``zspaprune_ops.reference.naive.select_batched``.

    visual [B, N, D] and prompt [B, T, D] (float16/bfloat16/float32; a feature stride other
    than 1 costs a contiguous copy), masks bool [B, T] / [B, N] or None. Returns int64
    [B, keep], ascending rows. ``gram`` forces (True) or forbids (False) the Gram scratch
    (default: ``uses_gram``); ``parts``: programs per image of the streaming launch 2 (default:
    ``stream_parts``). Extra memory, float32: [B, N] x (3 + 2 * feature splits) and [B, D] for
    keys and partial sums, a [chunk, N, N] Gram scratch (<= GRAM_MAX_BYTES) in Gram mode,
    [B, ceil(N / 2048), N] nearest-neighbour maxima ([B, ceil(N / 64), N] in Gram mode) when a
    row can start with DivPrune's pick, and int64 [B, SYNC_WORDS] sync words when streaming.

    Raises RuntimeError if a cooperative row failed (a grid-wide wait passed BARRIER_TIMEOUT_S;
    its row is then all -1): checked with one sync, only on that path, whatever
    ``set_value_checks`` says, except while a CUDA graph is being captured (then the caller
    sees the -1 row: ``picks[:, 0] < 0`` flags it without a sync).
    """
    visual, prompt = _rows_contiguous(visual), _rows_contiguous(prompt)
    B, N, _ = visual.shape
    gram = uses_gram(N) if gram is None else gram
    picks = torch.empty(B, keep, device=visual.device, dtype=torch.int64)
    guard = torch.cuda.device(visual.device) if visual.is_cuda else contextlib.nullcontext()
    chunk = gram_chunk(B, N) if gram else B
    with guard:
        for start in range(0, B, chunk):
            rows = slice(start, start + chunk)
            _select_chunk(visual[rows], prompt[rows], keep, relevance_ratio,
                          None if prompt_mask is None else prompt_mask[rows],
                          None if visual_mask is None else visual_mask[rows], gram, parts,
                          picks[rows])
    return picks


def _select_chunk(visual, prompt, keep, relevance_ratio, prompt_mask, visual_mask, gram, parts,
                  picks):
    B, N, D = visual.shape
    T = prompt.shape[1]
    n_core = core_size(keep, relevance_ratio)
    nearest_needed = may_start_with_divprune(T, keep, relevance_ratio, prompt_mask is not None)
    n_splits, split_len = feature_splits(D, tile_k(visual.dtype))
    n_tiles = triton.cdiv(N, TILE)
    tiles_per_group = 1 if gram else NEAREST_GROUP_COLS // TILE
    n_groups = triton.cdiv(n_tiles, tiles_per_group) if gram or nearest_needed else 0
    n_sync = 0 if gram else SYNC_WORDS

    # one float32 allocation, carved up (each allocation costs host time); every view starts on
    # a 128-byte boundary, so the kernels' pointers are aligned whatever B, N and D are (Triton
    # specializes on alignment: an unaligned view would compile a variant of its own)
    sizes = {"inv": B * N, "rel": B * N, "fill": B * N, "part": B * 2 * n_splits * N, "psum": B * D, "psq": B * n_splits,
             "gram": B * N * N if gram else 0, "nearest": B * n_groups * N if nearest_needed else 0}
    offsets = aligned_offsets(sizes.values(), SCRATCH_ALIGN)
    scratch = torch.empty(offsets[-1], device=visual.device, dtype=torch.float32)
    views = {name: scratch[start:start + size]
             for (name, size), start in zip(sizes.items(), offsets)}
    inv, rel, fill = views["inv"], views["rel"], views["fill"]
    counts = torch.empty(B, device=visual.device, dtype=torch.int32)
    sync = torch.empty(B, max(n_sync, 1), device=visual.device, dtype=torch.int64)
    gram_scratch = views["gram"] if gram else inv
    nearest = views["nearest"] if nearest_needed else inv

    _prompt_kernel[(triton.cdiv(D, PROMPT_BLOCK_D), B)](
        prompt, _or(prompt_mask, inv), views["psum"], counts, sync, picks, T, D, n_sync, keep,
        *prompt.stride()[:2], *_strides(prompt_mask), HAS_PMASK=prompt_mask is not None,
        BD=PROMPT_BLOCK_D, BT=PROMPT_BLOCK_T, num_warps=PROMPT_WARPS, **LAUNCH_OPTIONS)
    _prepare_kernel[(n_tiles, n_splits + n_groups, B)](
        visual, _or(visual_mask, inv), views["psum"], counts, views["part"], views["psq"], fill,
        gram_scratch, nearest, N, D, n_core, n_splits, split_len, tiles_per_group, n_groups,
        *visual.stride()[:2], *_strides(visual_mask), HAS_VMASK=visual_mask is not None,
        STORE_GRAM=gram, NEED_NEAREST=nearest_needed,
        DOT_FP32=visual.dtype == torch.bfloat16 and _interpreted(), BM=TILE,
        BK=tile_k(visual.dtype), num_warps=PREPARE_WARPS, num_stages=prepare_stages(visual.dtype),
        **LAUNCH_OPTIONS)
    if gram:
        block, warps = register_block(N)
        _select_gram_kernel[(B,)](gram_scratch, views["part"], views["psq"], counts, inv, fill,
                                  nearest, picks, N, keep, n_core, n_splits, n_groups,
                                  NEED_NEAREST=nearest_needed, BLOCK=block, ROWS=CORE_ROWS,
                                  num_warps=warps, **LAUNCH_OPTIONS)
        return
    args = (visual, views["part"], views["psq"], counts, inv, rel, fill, nearest, sync, picks,
            N, D, keep, n_core, n_splits, n_groups, n_sync)
    parts = _launch_stream(args, B, N, visual, parts, nearest_needed)
    if parts > 1 and not _capturing(visual):
        # whatever set_value_checks says: the row of a failed image is all -1, and a caller
        # that gathers with it would read the last token silently
        failed = (sync[:, 0] & _FAILED.value) != 0
        if bool(failed.any()):
            raise RuntimeError(
                f"zspaprune: the cooperative selection kernel failed for images "
                f"{failed.nonzero().flatten().tolist()} of this call (a grid-wide wait passed "
                f"BARRIER_TIMEOUT_S = {BARRIER_TIMEOUT_S} s; their rows are -1); set "
                "zspaprune_ops.kernels.select.COOPERATIVE = False to run one program per image")


def _launch_stream(args, B, N, visual, parts, nearest_needed) -> int:
    """Launch the streaming launch 2 with ``parts`` programs per image (default: as many as
    fit at once, as a cooperative grid). If the driver refuses a cooperative grid that large,
    tries half as many programs per image, down to one (no grid-wide wait), and warns once per
    process. Returns the programs per image used."""
    def launch(p, warmup=False):
        slice_len = triton.cdiv(triton.cdiv(N, p), STREAM_BLOCK_N) * STREAM_BLOCK_N
        options = dict(LAUNCH_OPTIONS, launch_cooperative_grid=True) if p > 1 else LAUNCH_OPTIONS
        kernel = (functools.partial(_select_stream_kernel.warmup, grid=(p, B)) if warmup
                  else _select_stream_kernel[(p, B)])
        return kernel(*args, p, slice_len, int(BARRIER_TIMEOUT_S * 1e6), *visual.stride()[:2],
                      NEED_NEAREST=nearest_needed, BLOCK_N=STREAM_BLOCK_N,
                      CAND=STREAM_CANDIDATES, BLOCK_K=candidate_k(visual.dtype),
                      CHUNK=LIST_CHUNK, INTERPRETED=_interpreted(), num_warps=STREAM_WARPS,
                      **options)

    if parts is None:
        per_sm = 1
        if visual.is_cuda and COOPERATIVE:  # the variant every P > 1 runs (P is not specialized)
            key = (visual.device, visual.dtype, nearest_needed, visual.stride(1) % 16 == 0)
            if key not in _OCCUPANCY:
                _OCCUPANCY[key] = _programs_per_sm(launch(2, warmup=True))
            per_sm = _OCCUPANCY[key]
        parts = stream_parts(B, N, visual.device, per_sm)
    while parts > 1:
        try:
            launch(parts)
            return parts
        except RuntimeError as error:  # CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
            if not _refused(error):
                raise
            _warn_refused(parts, B, error)
            parts //= 2
    launch(1)
    return 1


_OCCUPANCY = {}
"""Programs per SM of the cooperative streaming kernel, per (device, dtype, DivPrune pass,
aligned rows): measured once from the compiled kernel."""
_warned = []


def _refused(error: RuntimeError) -> bool:
    text = str(error).lower()
    return "cooperative" in text or "too large" in text or "too many blocks" in text


def _warn_refused(parts: int, batch: int, error: RuntimeError) -> None:
    if not _warned:
        _warned.append(True)
        warnings.warn(f"zspaprune: the driver refused a cooperative grid of {parts} x {batch} "
                      f"programs ({error}); trying fewer programs per image (slower). Warned "
                      "once per process.", RuntimeWarning, stacklevel=4)


def _programs_per_sm(kernel) -> int:
    """Occupancy of a compiled kernel (programs resident per SM) from its registers, shared
    memory and warps, as CUDA allocates them; 1 where a field cannot be read."""
    try:
        kernel._init_handles()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        warps = kernel.metadata.num_warps
        regs_per_warp = triton.cdiv(max(kernel.n_regs, 1) * 32, 256) * 256
        by_regs = props.regs_per_multiprocessor // (regs_per_warp * warps)
        by_threads = props.max_threads_per_multi_processor // (warps * 32)
        shared = kernel.metadata.shared
        by_shared = props.shared_memory_per_multiprocessor // (shared + 1024) if shared else 32
        return max(1, min(by_regs, by_threads, by_shared, 32))
    except Exception:  # noqa: BLE001 (a field missing in this torch/Triton version: be safe)
        return 1


def _capturing(visual) -> bool:
    return visual.is_cuda and torch.cuda.is_current_stream_capturing()


def aligned_offsets(sizes, align: int) -> list:
    """Start of each of ``sizes`` (elements) in one buffer, each a multiple of ``align``, and
    the buffer's length last."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + triton.cdiv(size, align) * align)
    return offsets


def feature_splits(d: int, chunk: int):
    """(splits, features per split) of launch 1's row statistics: about SPLIT_FEATURES each,
    a multiple of ``chunk``, at most MAX_SPLITS splits."""
    splits = min(MAX_SPLITS, triton.cdiv(d, SPLIT_FEATURES))
    length = triton.cdiv(triton.cdiv(d, splits), chunk) * chunk
    return triton.cdiv(d, length), length


def _or(mask, dummy):
    return mask if mask is not None else dummy


def _interpreted() -> bool:
    # Triton's interpreter multiplies bfloat16 dot operands as raw uint16 bits (3.9.0): there the
    # tiles are upcast first. Bfloat16 products are exact in float32, so only the summation order
    # differs from the tensor-core path.
    return type(_prepare_kernel).__name__ == "InterpretedFunction"


def _rows_contiguous(x):
    """The kernels index features with unit stride from a 16-byte aligned start (Triton
    compiles another variant for an unaligned pointer): copy only inputs that are not."""
    if (x.shape[-1] == 1 or x.stride(-1) == 1) and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _strides(mask):
    return mask.stride() if mask is not None else (0, 0)
