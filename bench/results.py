"""One results format for every benchmark.

Each measurement is a JSON row appended to ``bench/results/<device>.json``::

    {"bench": "select", "shape": {"B": 1, "N": 576, ...}, "impl": "fused",
     "median_us": 41.2, "extra_peak_bytes": 123456, "device": "NVIDIA H100 80GB HBM3",
     "torch": "2.11.0", "triton": "3.6.0", "commit": "abc1234", "date": "2026-11-25"}

Scripts call ``append(rows, device)``; ``python bench/results.py`` renders every file into
``bench/RESULTS.md``.
"""
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({device.type})" if device.type != "cpu" else "cpu"


def environment(device: torch.device) -> dict:
    """Fields every row carries: device name, versions, commit and date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": commit, "date": datetime.date.today().isoformat()}


def results_path(name: str) -> Path:
    return RESULTS_DIR / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + ".json")


def append(rows: list, device: torch.device) -> Path:
    """Add ``rows`` (dicts with bench, shape, impl, median_us, extra_peak_bytes) to the file of
    ``device``, each completed with the environment fields. Returns the file."""
    env = environment(device)
    path = results_path(env["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    existing.extend({**row, **env} for row in rows)
    path.write_text(json.dumps(existing, indent=1) + "\n")
    return path


def load_all() -> list:
    rows = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        rows.extend(json.loads(path.read_text()))
    return rows


def render(rows: list) -> str:
    """Markdown: one table per (device, bench, run), one line per shape, one column per impl."""
    out = ["# Benchmark results", "",
           "Rendered by `python bench/results.py` from `bench/results/*.json`. Times are "
           "medians in µs; each table is one run on one machine.", ""]
    runs = {}
    for row in rows:
        key = (row["device"], row["bench"], row["torch"], row["triton"], row["commit"], row["date"])
        runs.setdefault(key, []).append(row)
    for (device, bench, torch_v, triton_v, commit, date), group in runs.items():
        impls = list(dict.fromkeys(r["impl"] for r in group))
        shapes = list(dict.fromkeys(json.dumps(r["shape"], sort_keys=True) for r in group))
        out += [f"## {bench} on {device}", "",
                f"torch {torch_v}, triton {triton_v}, commit {commit}, {date}", "",
                "| shape | " + " | ".join(impls) + " |",
                "|---|" + "---|" * len(impls)]
        for shape in shapes:
            cells = []
            for impl in impls:
                match = [r for r in group if r["impl"] == impl
                         and json.dumps(r["shape"], sort_keys=True) == shape]
                cells.append(f"{match[-1]['median_us']:.1f}" if match else "")
            label = ", ".join(f"{k}={v}" for k, v in json.loads(shape).items())
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    text = render(load_all())
    (HERE / "RESULTS.md").write_text(text)
    sys.stdout.write(text)
