"""Packaging and project structure: `pip install .` puts kernels/ and reference/ inside the
package, never at the top level; triton is needed only where it exists; no import cycles; the
slow-test list names real tests."""
import functools
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

    # triton only where it has wheels (Linux x86_64 / aarch64): pip install works elsewhere
    from packaging.requirements import Requirement

    (metadata,) = target.glob("zspaprune-*.dist-info/METADATA")
    requires = [Requirement(line.split(":", 1)[1].strip())
                for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist:")]
    (triton,) = [r for r in requires if r.name == "triton"]
    assert str(triton.specifier) == ">=3.6"
    platforms = {("Linux", "x86_64"): True, ("Linux", "aarch64"): True, ("Darwin", "arm64"): False,
                 ("Windows", "AMD64"): False, ("Linux", "ppc64le"): False}
    for (system, machine), wanted in platforms.items():
        environment = {"platform_system": system, "platform_machine": machine, "extra": ""}
        assert triton.marker.evaluate(environment) is wanted, (system, machine)
    (torch_requirement,) = [r for r in requires if r.name == "torch"]
    assert torch_requirement.marker is None


NO_TRITON = """
import sys

class NoTriton:  # as on macOS / Windows: no triton wheel, so not installed
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton' (blocked by the test)")

sys.meta_path.insert(0, NoTriton())
import torch
import zspaprune_ops, zspaprune_ops.cli, zspaprune_ops.models, zspaprune_ops.demo
import zspaprune_ops.eval.run, zspaprune_ops.checkpoint

visual, prompt = torch.randn(2, 30, 8), torch.randn(2, 4, 8)
kept = torch.ops.zspaprune.select(visual, prompt, 5, 0.5, None, None)
assert torch.equal(kept, zspaprune_ops.select(visual, prompt, 5))
assert kept.shape == (2, 5) and "triton" not in sys.modules
try:
    zspaprune_ops.select(visual, prompt, 5, backend="triton")
except Exception as error:
    print(type(error).__name__, error)
"""


@functools.lru_cache(maxsize=None)
def _run_without_triton():
    """``NO_TRITON`` in a fresh interpreter (CPU): its stdout, the triton backend's error."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", NO_TRITON], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_package_works_without_triton():
    """Off CUDA nothing imports triton: the op, the wrapper, the CLI, the demo and eval
    modules import and select with triton unimportable."""
    _run_without_triton()


def test_the_triton_backend_without_triton_says_what_to_install():
    out = _run_without_triton()
    assert out.startswith("RuntimeError") and "pip install triton" in out, out


def _package_modules():
    """{module name: source path} of every module the wheel installs (kernels/, reference/
    under their installed names)."""
    homes = {"zspaprune_ops": ROOT / "zspaprune_ops", "zspaprune_ops.kernels": ROOT / "kernels",
             "zspaprune_ops.reference": ROOT / "reference"}
    modules = {}
    for package, folder in homes.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _imports(path, modules):
    """The package's modules ``path`` imports anywhere in it (function bodies too), except its
    own ancestor packages (a submodule may read its package's re-exports)."""
    import ast

    name = next(n for n, p in modules.items() if p == path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                         else node.module for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def test_no_import_cycles_between_the_packages_modules():
    """Each concept one home, each dependency one way: no module imports (even lazily) one that
    imports it back, through any chain."""
    modules = _package_modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    cycles = []
    for start in graph:  # a path back to itself from any module: small graph, plain DFS
        stack, seen = [(start, (start,))], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join((*trail, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*trail, nxt)))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))
    assert "zspaprune_ops.errors" in graph["zspaprune_ops.cli"]  # the graph sees real imports


def test_every_slow_entry_names_an_existing_test():
    """A renamed test would silently lose its ``slow`` mark: each entry of SLOW_TESTS names a
    test function defined in its file."""
    import re

    from conftest import SLOW_TESTS

    for key in SLOW_TESTS:
        file, test = key.split("::")
        source = (ROOT / "tests" / file).read_text(encoding="utf-8")
        function = test.split("[", 1)[0]
        assert re.search(rf"^def {function}\(", source, re.M), f"{key}: no such test"
