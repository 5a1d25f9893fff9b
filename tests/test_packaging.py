"""`pip install .` puts kernels/ and reference/ inside the package, never at the top level."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_maps_kernels_and_reference_inside_the_package(tmp_path):
    pytest.importorskip("setuptools")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                   check=True, timeout=300)
    (wheel,) = tmp_path.glob("zspaprune-*.whl")
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   timeout=300)
    top_level = {p.name for p in target.iterdir()} - {"bin"}
    assert {n for n in top_level if not n.endswith(".dist-info")} == {"zspaprune_ops"}
    assert (target / "zspaprune_ops" / "assets" / "shapes_llava" / "model.safetensors").is_file()
    probe = ("import zspaprune_ops, zspaprune_ops.kernels, zspaprune_ops.reference, torch\n"
             "import zspaprune_ops.world.scenes, zspaprune_ops.eval.methods\n"
             "import zspaprune_ops.testing.measure\n"
             "assert zspaprune_ops.__file__.startswith(%r)\n"
             "v = torch.randn(1, 9, 4); print(zspaprune_ops.reference.select(v, v[:, :2], 3).tolist())"
             % str(target))
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    assert len(eval(out.stdout)[0]) == 3
