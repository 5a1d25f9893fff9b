"""One results format for every benchmark.

Each measurement is a JSON row in a results file (a JSON list)::

    {"bench": "select", "shape": {"B": 1, "N": 576, ...}, "impl": "fused",
     "median_us": 41.2, "extra_peak_bytes": 123456, "device": "NVIDIA H100 80GB HBM3",
     "torch": "2.11.0", "triton": "3.6.0", "commit": "abc1234", "date": "2026-11-25"}

``"bench": "accuracy"`` rows (``zspaprune eval``) carry ``method``, ``keep``, ``accuracy``,
``ci95``, ``agreement`` and ``right`` (each question's outcome, ``"0"``/``"1"``) instead of times
(format: ``zspaprune_ops/eval/run.py``).

Optional fields: ``"skipped"`` (why the impl did not run; ``median_us`` is then null),
``"floor_bytes"`` / ``"floor_us"`` / ``"bandwidth_Bps"`` / ``"bandwidth_source"`` (the HBM
floor: bytes that must be read once / the device's bandwidth; ``floor_us`` null where the
bandwidth is unknown or n/a, as on CPU), ``"compile_s"`` (one-off compile time, not timed).

Where rows go: the benchmarks' ``--out FILE``; by default a fresh file per run under
``bench/results/local/`` (git-ignored, see ``new_results_file``), so a trial run never edits the
committed ``bench/results/<device>.json``, which a run writes only when asked with ``--out``.
``python bench/results.py`` renders the committed files into ``bench/RESULTS.md`` (plus
``bench/NOTES.md`` verbatim, if present: hand-written analysis that survives re-rendering);
``python bench/results.py FILE...`` prints the rendering of those files instead.
"""
import datetime
import json
import re
import sys
from pathlib import Path

import torch

from zspaprune_ops.testing.measure import device_name, environment  # noqa: F401 (re-exported)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SPEEDUP_OF = "fused"
"""The impl whose speedup over every other impl of a table is rendered."""
FLOOR_RATIO = ("blocked", "matmul_floor")
"""(impl, floor): where both are in a table, the impl's time as a multiple of the floor's."""

KNOWN_BANDWIDTH_BPS = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H200": 4.8e12}
"""Spec HBM bandwidth by a substring of the CUDA device name (H100 SXM, H200)."""


def hbm_bandwidth(device: torch.device) -> tuple:
    """(bytes per second or None, where the number comes from) for the memory of ``device``.

    Known GPUs (H100 SXM, H200) get their spec value; other CUDA devices are measured with a
    1 GiB device-to-device copy (read + write bytes / median time, below the spec peak); the
    CPU has no HBM floor: (None, "n/a (cpu)").
    """
    if device.type != "cuda":
        return None, f"n/a ({device.type})"
    name = torch.cuda.get_device_name(device)
    for key, bandwidth in KNOWN_BANDWIDTH_BPS.items():
        if key in name:
            return bandwidth, f"spec ({key})"
    return _measured_copy_bandwidth(device), "measured (1 GiB device-to-device copy)"


def _measured_copy_bandwidth(device: torch.device) -> float:
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(10):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * source.numel() / sorted(times)[len(times) // 2]


def floor_fields(floor_bytes: int, bandwidth: tuple) -> dict:
    """The HBM-floor fields of a row, from the bytes to read and ``hbm_bandwidth(...)``."""
    bytes_per_s, source = bandwidth
    floor_us = floor_bytes / bytes_per_s * 1e6 if bytes_per_s else None
    return {"floor_bytes": floor_bytes, "floor_us": floor_us, "bandwidth_Bps": bytes_per_s,
            "bandwidth_source": source}


def results_path(name: str) -> Path:
    """The committed results file of a device name: ``bench/results/<name>.json``."""
    return RESULTS_DIR / (_slug(name) + ".json")


def new_results_file(device: torch.device) -> Path:
    """A fresh, git-ignored file for one run: ``bench/results/local/<device>-<time>.json``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return RESULTS_DIR / "local" / f"{_slug(device_name(device))}-{stamp}.json"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def append(rows: list, device: torch.device, path: Path) -> Path:
    """Add ``rows`` (dicts with bench, shape, impl, median_us, extra_peak_bytes) to the results
    file ``path`` (created if missing), each completed with the environment fields of
    ``device``. Returns ``path``."""
    env = environment(device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    existing.extend({**row, **env} for row in rows)
    path.write_text(json.dumps(existing, indent=1) + "\n")
    return path


def load(paths) -> list:
    rows = []
    for path in paths:
        rows.extend(json.loads(Path(path).read_text()))
    return rows


def render(rows: list, source: str = "`bench/results/*.json`") -> str:
    """Markdown: one table per (device, bench, run), one line per shape, one column per impl,
    then the speedup of ``fused`` over each other impl and an extra-peak-memory table."""
    out = ["# Benchmark results", "",
           f"Rendered by `python bench/results.py` from {source}. Times are "
           "medians in µs; each table is one run on one machine. `(n× floor)` = the time as a "
           "multiple of the HBM floor (bytes that must be read once / the device's bandwidth).",
           ""]
    if not any(_is_gpu(row["device"]) for row in rows):
        out += ["**No GPU results yet: the GPU numbers are still to be measured** "
                "(`python bench/bench_select.py --preset gpu` on a CUDA machine).", ""]
    runs = {}
    for row in rows:
        model_data = ((row["shape"].get("model"), row["shape"].get("data"))
                      if row["bench"] in ("accuracy", "relevance_coverage") else None)
        key = (row["device"], row["bench"], row["torch"], row["triton"], row["commit"], row["date"],
               model_data)
        runs.setdefault(key, []).append(row)
    for (device, bench, torch_v, triton_v, commit, date, _), group in runs.items():
        out += [f"## {bench} on {device}", "",
                f"torch {torch_v}, triton {triton_v}, commit {commit}, {date}", ""]
        if bench == "accuracy":
            from zspaprune_ops.eval.report import paired_table, table

            out += [f"{group[0]['shape']['model']} on {group[0]['shape']['data']}", "",
                    table(group, markdown=True), ""]
            paired = paired_table(group)
            if paired:
                out += ["Paired differences against DivPrune on the same questions (accuracy "
                        "points, 95% normal interval; in brackets the questions only the method "
                        "got right / only DivPrune):", "", paired, ""]
            continue
        if bench == "relevance_coverage":
            out += render_coverage(group) + [""]
            continue
        if not _is_gpu(device):
            threads = sorted({r["cpu_threads"] for r in group if r.get("cpu_threads")})
            on = f" with {'/'.join(map(str, threads))} torch thread(s)" if threads else ""
            out += [f"CPU smoke numbers{on} (a functional check of the harness, not a "
                    "performance result; no HBM floor on a CPU).", ""]
        out += (render_e2e_table(group) if bench == "e2e_prefill" else render_table(group)) + [""]
    notes = HERE / "NOTES.md"
    if notes.exists():
        out += [notes.read_text()]
    return "\n".join(out)


def render_table(group: list) -> list:
    """Markdown lines of one run's rows: times, fused speedups, skip reasons, extra memory."""
    impls = list(dict.fromkeys(r["impl"] for r in group))
    shapes = {_shape_key(r): r["shape"] for r in group}
    latest = {(_shape_key(r), r["impl"]): r for r in group}
    others = [impl for impl in impls if impl != SPEEDUP_OF] if SPEEDUP_OF in impls else []
    with_floor = any(r.get("floor_us") for r in group)
    reasons = []
    with_model = any(r.get("predicted_us") for r in group)
    header = ["shape"] + (["HBM floor µs"] if with_floor else []) + [f"{i} µs" for i in impls]
    header += [f"{SPEEDUP_OF} vs {impl}" for impl in others]
    floor_ratio = all(impl in impls for impl in FLOOR_RATIO)
    header += [f"{FLOOR_RATIO[0]} / {FLOOR_RATIO[1]}"] if floor_ratio else []
    header += ["model µs", "graph / model"] if with_model else []
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for shape in shapes:
        rows = {impl: latest.get((shape, impl)) for impl in impls}
        floor = next((r.get("floor_us") for r in rows.values() if r and r.get("floor_us")), None)
        cells = [_label(shapes[shape])]
        cells += [f"{floor:.1f}" if floor else "n/a"] if with_floor else []
        for row in rows.values():
            cells.append(_time_cell(row, floor, reasons))
        fused = rows.get(SPEEDUP_OF)
        for impl in others:
            cells.append(_speedup_cell(fused, rows[impl]))
        if floor_ratio:
            cells.append(_speedup_cell(rows[FLOOR_RATIO[1]], rows[FLOOR_RATIO[0]]))
        if with_model:  # the model predicts a CUDA-graph replay (kernels/model.py)
            predicted = next((r["predicted_us"] for r in rows.values()
                              if r and r.get("predicted_us")), None)
            graph = rows.get("fused_graph") or fused
            measured = graph.get("median_us") if graph else None
            cells += [f"{predicted:.1f}" if predicted else "",
                      f"{measured / predicted:.2f}×" if measured and predicted else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"{i}. skipped: {reason}" for i, reason in enumerate(reasons, 1)]
    if any(r.get("extra_peak_bytes") is not None for r in group):
        lines += ["", "Extra peak device memory (MiB, beyond the inputs):", "",
                  "| shape | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
        for shape in shapes:
            cells = [_mib(latest.get((shape, impl))) for impl in impls]
            lines.append(f"| {_label(shapes[shape])} | " + " | ".join(cells) + " |")
    return lines


def render_coverage(group: list) -> list:
    """Markdown lines of one run of ``bench/world_relevance.py`` on one model and data set
    (``render`` groups the rows so): per budget, how often the relevance top-``keep`` covers the
    object the question names, per prompt, with the new prompt's paired difference against the
    old one."""
    from zspaprune_ops.eval.report import paired_cell

    prompts = list(dict.fromkeys(r["prompt"] for r in group))
    cell = {(r["prompt"], r["keep"]): r for r in group}
    keeps = sorted({r["keep"] for r in group}, reverse=True)
    shape = group[0]["shape"]
    lines = [f"{shape['model']} on {shape['data']}, {shape['questions']} questions "
             "naming an object in the scene: share of questions whose relevance top-keep "
             "holds a patch of the named object (in brackets: share of the top-keep on it; "
             "AUC: chance that a named-object patch outranks a background patch)", "",
             "| kept tokens | " + " | ".join(prompts) + " | random picks | "
             "message - all (paired) |", "|---" * (len(prompts) + 3) + "|"]
    for keep in keeps:
        cells = [f"{cell[p, keep]['covered'] * 100:.1f} ({cell[p, keep]['on_named'] * 100:.1f})"
                 for p in prompts]
        random = f"{cell[prompts[0], keep]['random_covered'] * 100:.1f}"
        paired = (paired_cell(cell["message", keep]["hits"], cell["all", keep]["hits"])
                  if {"message", "all"} <= set(prompts) else "")
        lines.append(f"| {keep:g} | " + " | ".join(cells) + f" | {random} | {paired} |")
    lines.append("| AUC | " + " | ".join(f"{cell[p, keeps[0]]['auc']:.3f}" for p in prompts)
                 + " | 0.500 | |")
    return lines + [""]


def render_e2e_table(group: list) -> list:
    """Markdown lines of an end-to-end prefill run: one line per model shape and keep, the
    prefill time against the unpruned model and the selection's share of it."""
    latest = {(_shape_key(r), r["impl"]): r for r in group}
    shapes = {_shape_key(r): r["shape"] for r in group}
    lines = ["| shape | prefill ms | vs unpruned | selection ms | selection share | "
             "peak MiB | extra peak MiB |", "|---" * 7 + "|"]
    for key, shape in shapes.items():
        prefill = latest.get((key, "zspaprune")) or latest.get((key, "unpruned"))
        if prefill is None:
            continue
        selection = latest.get((key, "selection"))
        speedup = prefill.get("speedup_vs_unpruned")
        share = prefill.get("selection_share")
        cells = [_label(shape), f"{prefill['median_us'] / 1e3:.2f}",
                 f"{speedup:.2f}×" if speedup else "1.00× (unpruned)",
                 f"{selection['median_us'] / 1e3:.2f}" if selection else "",
                 f"{share:.1%}" if share is not None else "",
                 f"{prefill['peak_bytes'] / 2**20:.1f}" if prefill.get("peak_bytes") else "n/a",
                 _mib(prefill)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _is_gpu(device: str) -> bool:
    return not device.startswith("cpu")


def _label(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def _shape_key(row: dict) -> str:
    return json.dumps(row["shape"], sort_keys=True)


def _time_cell(row, floor, reasons: list) -> str:
    if row is None:
        return ""
    if row.get("median_us") is None:
        reason = row.get("skipped", "no time recorded")
        if reason not in reasons:
            reasons.append(reason)
        return f"skipped ({reasons.index(reason) + 1})"
    cell = f"{row['median_us']:.1f}"
    return cell + (f" ({row['median_us'] / floor:.0f}× floor)" if floor else "")


def _speedup_cell(fused, other) -> str:
    if not fused or not other or fused.get("median_us") is None or other.get("median_us") is None:
        return ""
    return f"{other['median_us'] / fused['median_us']:.2f}×"


def _mib(row) -> str:
    if row is None or row.get("extra_peak_bytes") is None:
        return "n/a"
    return f"{row['extra_peak_bytes'] / 2**20:.1f}"


if __name__ == "__main__":
    files = sys.argv[1:]
    if files:
        text = render(load(files), ", ".join(f"`{f}`" for f in files))
    else:
        text = render(load(sorted(RESULTS_DIR.glob("*.json"))))
        (HERE / "RESULTS.md").write_text(text)
    sys.stdout.write(text)
