"""The README's promises: its usage example runs, its test command is the one CI runs, the CLI works."""
import re
from pathlib import Path

import torch

import zspaprune_ops
from zspaprune_ops.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_usage_example_runs():
    usage = README.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace = {}
    exec(compile(code, "README usage", "exec"), namespace)
    kept = namespace["kept"]
    assert kept.shape == (2, 64) and kept.dtype == torch.int64
    assert torch.all(kept[:, 1:] > kept[:, :-1])


def test_ci_runs_the_readme_test_command():
    setup = README.split("## Setup", 1)[1].split("##", 1)[0]
    install, test = re.findall(r"```bash\n(.*?)\n```", setup, re.S)[:2]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
    assert "pip install --quiet torch==2.13.0" in ci_lines and "torch==2.13.0" in install


def test_cli_select_prints_the_ops_result(capsys):
    main(["select", "--n", "50", "--dim", "16", "--keep", "7", "--ratio", "0.5", "--seed", "3",
          "--batch", "2", "--repeat", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [list(map(int, line.split())) for line in lines[:2]]
    g = torch.Generator().manual_seed(3)
    visual = torch.randn(2, 50, 16, generator=g)
    prompt = torch.randn(2, 32, 16, generator=g)
    assert rows == zspaprune_ops.select(visual, prompt, 7, 0.5).tolist()
    assert "kept 7 of 50 tokens x 2 image(s)" in lines[2] and "median" in lines[2]
