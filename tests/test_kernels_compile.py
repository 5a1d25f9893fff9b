"""Every kernel configuration compiles for sm_80 and sm_90 ahead of time, without a GPU.

Runs ``python -m zspaprune_ops.kernels.aot`` in a fresh process (the kernels of this test
session are built for Triton's interpreter, which compiles nothing) with an empty Triton cache,
and prints its table: compile seconds, registers, shared memory, stack and local bytes. No
configuration may spill registers (SPILL 0), and no launch may leave Triton's
FMA-contraction default to chance (its warning).
"""
import os
import subprocess
import sys


def test_every_configuration_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "zspaprune_ops.kernels.aot", "--arch", "80", "90",
         "--jobs", "2", "--max-seconds", "60"],
        env=env, capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FP_FUSION" not in result.stderr  # every launch pins enable_fp_fusion
    rows = [line.split() for line in result.stdout.splitlines()
            if line.startswith(("prompt-sum", "prepare", "stream", "gram-select"))]
    assert len(rows) == 2 * 29 and all("FAILED" not in row for row in rows)
    assert all(row[-1] == "0" for row in rows), "a configuration spills registers"
