"""The README's and docs/'s promises: every ```python block runs as pasted, the install and test
commands are the ones CI runs, the CLI prints the op's result, every link to a file resolves.

Each python block (README.md and docs/*.md) runs in a fresh namespace, in a temporary folder. A checkpoint path in a block
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
PAGES = {"README.md": README, **{f"docs/{p.name}": p.read_text()
                                  for p in sorted((ROOT / "docs").glob("*.md"))}}
PLACEHOLDER = re.compile(r"""(["'])(path/to/[^"']*)\1""")
NO_TEST = "<!-- no-test"


def _tiny_llava(kind: str):
    def build(folder):
        from zspaprune_ops.testing.tiny_llava import build_tiny_llava
        # 224 px / 14 px patches: 256 image tokens, so the README's budgets really prune
        return build_tiny_llava(folder, kind=kind, image_size=224, patch_size=14)
    return build


def _tiny_qwen(folder):
    from zspaprune_ops.testing.tiny_qwen import build_tiny_qwen
    return build_tiny_qwen(folder, "qwen2_5_vl")


CHECKPOINTS = {
    "path/to/llava-1.5-7b-hf": _tiny_llava("llava"),
    "path/to/llava-v1.6-mistral-7b-hf": _tiny_llava("llava_next"),
    "path/to/Qwen2.5-VL-7B-Instruct": _tiny_qwen,
}
"""README checkpoint placeholder -> function saving a tiny model of that family to a folder."""


def python_blocks(text: str = README, page: str = "README.md"):
    """pytest params (code, id), one per ```python block, marked skip after a no-test line."""
    params = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip().rsplit("\n", 1)[-1]
        marks = [pytest.mark.skip(reason=before.strip())] if before.startswith(NO_TEST) else []
        params.append(pytest.param(match.group(1), id=f"{page} line {line}", marks=marks))
    return params


def all_python_blocks():
    return [block for page, text in PAGES.items() for block in python_blocks(text, page)]


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


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - absent, or PyPI's CUDA build beside a CPU torch
        return False


def run_block(code: str, checkpoint_dir) -> dict:
    if ("path/to/Qwen" in code and "AutoProcessor.from_pretrained" in code
            and not _torchvision_imports()):
        pytest.skip("transformers' Qwen processors need torchvision, which does not import here "
                    "(docs/huggingface.md: processors on a CPU machine)")
    code = PLACEHOLDER.sub(lambda m: repr(checkpoint_dir(m.group(2))), code)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, "documentation snippet", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("code", all_python_blocks())
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
    out, new_tokens = namespace["out"], namespace["new_tokens"]
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])  # as HF
    assert new_tokens.shape[0] == 1 and 1 <= new_tokens.shape[1] <= 32
    assert namespace["plain"] is model.model and namespace["model_25"].keep == 0.25
    assert type(namespace["model_25"]) is type(model)  # prune() picked the LLaVA wrapper
    quarter = namespace["model_25"].prune_inputs(inputs["input_ids"], inputs["pixel_values"])
    assert quarter.inputs_embeds.shape[1] == inputs["input_ids"].shape[1] - 256 + 64


def test_blocks_after_a_no_test_line_are_skipped_and_unknown_checkpoints_fail(checkpoint_dir):
    text = ("```python\nx = 1\n```\n<!-- no-test: needs a GPU -->\n```python\ny = 2\n```\n"
            "```bash\nls\n```\n")
    first, second = python_blocks(text)
    assert first.values == ("x = 1\n",) and not first.marks
    assert second.values == ("y = 2\n",) and second.marks[0].kwargs == {
        "reason": "<!-- no-test: needs a GPU -->"}
    with pytest.raises(pytest.fail.Exception, match="register one"):
        run_block('m = load("path/to/some-other-model")', checkpoint_dir)


def test_quick_start_op_example_selects(checkpoint_dir):
    quick_start = README.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    kept = run_block(code, checkpoint_dir)["kept"]
    assert kept.shape == (2, 64) and kept.dtype == torch.int64
    assert torch.all(kept[:, 1:] > kept[:, :-1])


def test_ci_installs_what_the_readme_says_and_runs_its_test_command():
    setup = README.split("## Install", 1)[1].split("\n## ", 1)[0]
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


@pytest.mark.parametrize("page", sorted(PAGES))
def test_links_to_files_resolve(page):
    """Every relative link of the README and the docs names a file or folder of the repository
    (its #anchor, if any, a heading of that page)."""
    folder = (ROOT / page).parent
    for target in re.findall(r"\]\(([^)\s]+)\)", PAGES[page]):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (folder / path).resolve() if path else ROOT / page
        assert resolved.exists(), f"{page}: link to {target} (no {resolved})"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", resolved.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{page}: no heading #{anchor} in {path or page}"
