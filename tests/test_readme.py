"""The README's promises: every ```python block runs as pasted, its setup commands are the ones
CI runs, the CLI prints the op's result.

Each python block runs in a fresh namespace, in a temporary folder. A checkpoint path in a block
is a string literal ``"path/to/<name>"`` registered in ``CHECKPOINTS``: the test saves a tiny
offline model of that family to a temporary folder and puts its path in place of the literal
(a block with an unregistered ``"path/to/..."`` fails: register a builder for it). A block right
after a ``<!-- no-test: why -->`` line is skipped (use sparingly; say why in the comment).
"""
import re
from pathlib import Path

import pytest
import torch

import zspaprune_ops
from zspaprune_ops.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PLACEHOLDER = re.compile(r"""(["'])(path/to/[^"']*)\1""")
NO_TEST = "<!-- no-test"


def _tiny_llava(kind: str):
    def build(folder):
        from zspaprune_ops.testing.tiny_llava import build_tiny_llava
        # 224 px / 14 px patches: 256 image tokens, so the README's budgets really prune
        return build_tiny_llava(folder, kind=kind, image_size=224, patch_size=14)
    return build


def _tiny_qwen(folder):
    pytest.importorskip("torchvision", reason="transformers' Qwen processors need torchvision")
    from zspaprune_ops.testing.tiny_qwen import build_tiny_qwen
    return build_tiny_qwen(folder, "qwen2_5_vl")


CHECKPOINTS = {
    "path/to/llava-1.5-7b-hf": _tiny_llava("llava"),
    "path/to/llava-v1.6-mistral-7b-hf": _tiny_llava("llava_next"),
    "path/to/Qwen2.5-VL-7B-Instruct": _tiny_qwen,
}
"""README checkpoint placeholder -> function saving a tiny model of that family to a folder."""


def python_blocks(text: str = README):
    """pytest params (code, id), one per ```python block, marked skip after a no-test line."""
    params = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip().rsplit("\n", 1)[-1]
        marks = [pytest.mark.skip(reason=before.strip())] if before.startswith(NO_TEST) else []
        params.append(pytest.param(match.group(1), id=f"README line {line}", marks=marks))
    return params


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    built = {}

    def get(placeholder: str) -> str:
        if placeholder not in CHECKPOINTS:
            pytest.fail(f"README checkpoint {placeholder!r} has no tiny model: register one in "
                        "tests/test_readme.py CHECKPOINTS")
        if placeholder not in built:
            folder = tmp_path_factory.mktemp("checkpoint")
            built[placeholder] = str(CHECKPOINTS[placeholder](folder))
        return built[placeholder]
    return get


def run_block(code: str, checkpoint_dir) -> dict:
    code = PLACEHOLDER.sub(lambda m: repr(checkpoint_dir(m.group(2))), code)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, "README.md block", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("code", python_blocks())
def test_python_block_runs_as_pasted(code, checkpoint_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_block(code, checkpoint_dir)


def test_blocks_are_found_and_the_llava_one_prunes(checkpoint_dir, tmp_path, monkeypatch):
    blocks = [param.values[0] for param in python_blocks()]
    assert len(blocks) >= 2
    (llava,) = [code for code in blocks if '"path/to/llava-1.5-7b-hf"' in code]
    monkeypatch.chdir(tmp_path)
    namespace = run_block(llava, checkpoint_dir)
    inputs, model = namespace["inputs"], namespace["model"]
    assert int((inputs["input_ids"] == model.model.config.image_token_id).sum()) == 256
    pruned = model.prune_inputs(inputs["input_ids"], inputs["pixel_values"])
    assert pruned.inputs_embeds.shape[1] == inputs["input_ids"].shape[1] - 256 + 64
    assert namespace["new_tokens"].shape[0] == 1 and 1 <= namespace["new_tokens"].shape[1] <= 32
    assert namespace["plain"] is model.model and namespace["model_128"].keep == 128
    assert type(namespace["model_128"]) is type(model)  # prune() picked the LLaVA wrapper


def test_blocks_after_a_no_test_line_are_skipped_and_unknown_checkpoints_fail(checkpoint_dir):
    text = ("```python\nx = 1\n```\n<!-- no-test: needs a GPU -->\n```python\ny = 2\n```\n"
            "```bash\nls\n```\n")
    first, second = python_blocks(text)
    assert first.values == ("x = 1\n",) and not first.marks
    assert second.values == ("y = 2\n",) and second.marks[0].kwargs == {
        "reason": "<!-- no-test: needs a GPU -->"}
    with pytest.raises(pytest.fail.Exception, match="register one"):
        run_block('m = load("path/to/some-other-model")', checkpoint_dir)


def test_usage_example_selects(checkpoint_dir):
    usage = README.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    kept = run_block(code, checkpoint_dir)["kept"]
    assert kept.shape == (2, 64) and kept.dtype == torch.int64
    assert torch.all(kept[:, 1:] > kept[:, :-1])


def test_ci_installs_what_the_readme_says_and_runs_its_test_command():
    setup = README.split("## Setup", 1)[1].split("\n## ", 1)[0]
    install, test = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert install == ("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
                       ' && pip install -e ".[hf,test]" && zspaprune demo')
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
    # CI keeps its own pin (its machine finds the CPU wheel locally): the same version
    assert "pip install --quiet torch==2.13.0" in ci_lines
    assert 'pip install --quiet -e ".[test,hf]"' in ci_lines


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
