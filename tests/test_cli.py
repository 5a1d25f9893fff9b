"""The command line: every user mistake is the subcommand's usage, one error line, exit status 2,
no traceback; --help shows every default."""
import os
import subprocess
import sys

import pytest
import torch

from zspaprune_ops.cli import build_parser, main


def usage_error(capsys, argv):
    """(stderr, stdout) of ``zspaprune argv``, which must exit with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    return out.err, out.out


def assert_one_error_line(err: str, command: str, message: str):
    assert err.startswith(f"usage: zspaprune {command} ")  # the subcommand's usage
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [line for line in err.splitlines() if line.startswith(f"zspaprune {command}:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


BUDGET = "must be a token count (an integer >= 1) or a share of each image's tokens (a number in (0, 1])"

MISTAKES = [  # (subcommand, arguments, message); the demo's are caught before any model loads
    ("select", ["--device", "foo"], "argument --device: unknown device 'foo'"),
    ("select", ["--device", "meta"], "argument --device: meta tensors hold no values"),
    ("select", ["--keep", "0"], f"argument --keep: {BUDGET}, got '0'"),
    ("select", ["--keep", "x"], f"argument --keep: {BUDGET}, got 'x'"),
    ("select", ["--keep", "1.5"], f"argument --keep: {BUDGET}, got '1.5'"),
    ("select", ["--keep", "64.0"], "argument --keep: a share of each image's tokens must be in "
                                    "(0, 1], got '64.0'; for 64 tokens per image write 64"),
    ("select", ["--keep", "nan"], f"argument --keep: {BUDGET}, got 'nan'"),
    ("select", ["--keep", "-0.5"], f"argument --keep: {BUDGET}, got '-0.5'"),
    ("select", ["--n", "10", "--keep", "11"], "--keep 11 is above --n 10"),
    ("select", ["--n", "-3"], "argument --n: must be >= 1"),
    ("select", ["--prompt-len", "-1"], "argument --prompt-len: must be >= 0"),
    ("select", ["--ratio", "1.5"], "argument --ratio: must be a number in [0, 1], got '1.5'"),
    ("select", ["--ratio", "nan"], "argument --ratio: must be a number in [0, 1]"),
    ("select", ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    ("select", ["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    ("select", ["--repeat", "0"], "argument --repeat: must be >= 1"),
    ("select", ["--bogus"], "unrecognized arguments: --bogus"),
    ("demo", ["--keep", "64", "0"], f"argument --keep: {BUDGET}, got '0'"),
    ("demo", ["--keep", "0.0"], f"argument --keep: {BUDGET}, got '0.0'"),
    ("eval", ["--budgets", "0.5", "2.5"], f"argument --budgets: {BUDGET}, got '2.5'"),
    ("demo", ["--ratio", "-0.1"], "argument --ratio: must be a number in [0, 1]"),
    ("demo", ["--image", "/no/such.png"], "argument --image: /no/such.png does not exist"),
    ("demo", ["--model", "/no/such/dir"], "argument --model: /no/such/dir does not exist"),
    ("demo", ["--device", "cuda:x"], "argument --device: unknown device 'cuda:x'"),
    ("demo", ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ("demo", ["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    ("demo", ["--out", "overlay.txt"], "--out overlay.txt: give an image file name, e.g. kept.png"),
]


@pytest.mark.parametrize("command, argv, message", MISTAKES,
                         ids=[" ".join([c, *a]) for c, a, _ in MISTAKES])
def test_mistakes_are_usage_errors(capsys, command, argv, message):
    err, out = usage_error(capsys, [command, *argv])
    assert_one_error_line(err, command, message)
    assert out == ""


@pytest.fixture
def bad_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    return path


def test_demo_unreadable_image_and_model_folder_are_usage_errors(capsys, tmp_path, bad_image):
    pytest.importorskip("transformers")
    err, _ = usage_error(capsys, ["demo", "--image", str(bad_image), "--out",
                                  str(tmp_path / "o.png")])
    assert_one_error_line(err, "demo", f"--image {bad_image}: not an image Pillow can read")
    err, _ = usage_error(capsys, ["demo", "--model", str(tmp_path), "--out",
                                  str(tmp_path / "o.png")])
    assert_one_error_line(err, "demo", f"--model {tmp_path}: not a loadable Gemma 3, InternVL, "
                                       "LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL or "
                                       "Qwen3-VL checkpoint (")
    assert not (tmp_path / "o.png").exists()


def run_cli(*argv, env=None):
    """``python -m zspaprune_ops.cli argv`` in a fresh interpreter (as the console script)."""
    return subprocess.run([sys.executable, "-m", "zspaprune_ops.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["select", "demo"])
def test_missing_cuda_is_a_usage_error(command):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    done = run_cli(command, "--device", "cuda")
    assert done.returncode == 2 and done.stdout == ""
    assert_one_error_line(done.stderr, command, "argument --device: cuda is not available here")


def test_triton_backend_without_the_interpreter_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("on CUDA the kernels run without the interpreter")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = run_cli("select", "--backend", "triton", "--n", "20", "--dim", "8", "--keep", "4",
                   env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert_one_error_line(done.stderr, "select", "--backend triton: backend='triton' on cpu "
                                                 "runs the kernels under Triton's interpreter")


def test_no_subcommand_is_a_usage_error(capsys):
    err, _ = usage_error(capsys, [])
    assert err.startswith("usage: zspaprune ") and "required: command" in err


def subparser(name: str):
    (commands,) = build_parser()._subparsers._group_actions  # argparse keeps them private
    return commands.choices[name]


@pytest.mark.parametrize("name", ["select", "demo", "eval"])
def test_help_shows_every_default(name, capsys):
    sub = subparser(name)
    help_text = " ".join(sub.format_help().split())
    for action in sub._actions:
        if action.dest in ("help", "run", "command_parser"):
            continue
        assert "(default: " in (action.help or ""), f"--{action.dest} has no default in --help"
        if action.default is not None:
            default = repr(action.default) if "%(default)r" in action.help else str(action.default)
            assert f"(default: {default})" in help_text, action.dest


def test_select_prints_the_ops_result_for_integer_options(capsys):
    main(["select", "--n", "30", "--dim", "8", "--keep", "5", "--batch", "2", "--repeat", "1",
          "--dtype", "bfloat16", "--backend", "reference"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 5 for line in lines[:2])
    assert "kept 5 of 30 tokens x 2 image(s), D=8, ratio=0.5, bfloat16 on cpu (reference)" \
        in lines[2]


@pytest.mark.parametrize("text, value", [("64", 64), ("1", 1), ("0.25", 0.25), ("1.0", 1.0),
                                         (".5", 0.5), ("1e-1", 0.1), ("0.1111", 0.1111)])
def test_budgets_are_token_counts_or_shares(text, value):
    """--keep (select, demo) and --budgets (eval) share one parser: an integer is tokens per
    image, a number in (0, 1] a share of each image's tokens, as the wrappers take keep."""
    for argv in (["select", "--keep", text], ["demo", "--keep", text],
                 ["eval", "--budgets", text]):
        args = build_parser().parse_args(argv)
        parsed = args.keep if argv[0] != "eval" else args.budgets
        parsed = parsed[0] if isinstance(parsed, list) else parsed
        assert parsed == value and type(parsed) is type(value), argv


def test_select_keeps_a_share_of_n(capsys):
    main(["select", "--n", "30", "--dim", "8", "--keep", "0.25", "--repeat", "1",
          "--backend", "reference"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines[0].split()) == 8  # floor(0.25 * 30 + 0.5)
    assert "kept 8 of 30 tokens" in lines[1]
