"""Test-session setup: Triton's interpreter without CUDA, and the ``slow`` marks.

``TRITON_INTERPRET`` is read when ``triton`` is imported (kernels decorated then become
interpreted functions), so it is set here, before any test module imports triton.

``SLOW_TESTS`` marks the tests that take 5 s or more on 2 shared CPU cores (and every AOT
compile, wheel build, training run and long eval), so that ``pytest -m "not slow" tests`` is a
quick loop. One list for the whole suite, with the reason and the measured time of each
(``tests/test_packaging.py`` checks that every entry names a test that exists).
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py ran"
    os.environ["TRITON_INTERPRET"] = "1"

SLOW_TESTS = {
    # test id (every parametrization of a function, or one "name[params]") -> why, as measured
    # on 2 shared CPU cores (2026-12-02, torch 2.13.0+cpu, triton 3.9.0, transformers 5.24.0)
    "test_kernels_compile.py::test_every_configuration_compiles_for_sm80_and_sm90":
        "AOT compile of every kernel configuration for sm_80 and sm_90: 162 s",
    "test_eval.py::test_shipped_model_accuracy_on_fresh_questions": "long eval: 46 s",
    "test_bench.py::test_benchmark_select[reference_compiled]": "torch.compile + timing: 29 s",
    "test_qwen.py::test_torch_compile_of_the_wrapped_forward": "torch.compile: 20 s",
    "test_llava.py::test_torch_compile_of_the_wrapped_forward": "torch.compile: 18 s",
    "test_kernels.py::test_larger_register_blocks_and_column_groups[N1100-stream]":
        "Triton's interpreter at N = 1100: 10 s",
    "test_demo.py::test_demo_default_end_to_end": "the whole demo: 9 s",
    "test_llava.py::test_padded_batch_equals_per_sample_runs[left-llava_next]": "8 s",
    "test_llava.py::test_padded_batch_equals_per_sample_runs[left-llava]": "6 s",
    "test_llava.py::test_padded_batch_equals_per_sample_runs[right-llava]": "5 s",
    "test_qwen.py::test_pruned_run_equals_the_full_run_with_the_pruned_tokens_masked_out"
    "[True-qwen2_5_vl]": "8 s",
    "test_qwen.py::test_pruned_run_equals_the_full_run_with_the_pruned_tokens_masked_out"
    "[False-qwen3_vl]": "7 s",
    "test_qwen.py::test_keep_everything_reproduces_the_unwrapped_model[qwen2_5_vl]": "5 s",
    "test_op.py::test_compile_fullgraph_equals_eager[inductor-static]": "inductor compile: 6 s",
    "test_packaging.py::test_wheel_maps_kernels_and_reference_inside_the_package":
        "wheel build and install: 5 s",
    "test_world.py::test_training_script_runs_a_few_steps_and_saves_a_loadable_model":
        "training: 4 s",
    "test_world.py::test_frozen_vision_instruction_tuning_moves_the_language_model_only":
        "training: 2 s",
    "test_demo.py::test_demo_runs_the_new_families_and_draws_their_views":
        "a tiny OneVision / InternVL / Gemma 3 through the whole demo: 1-4 s each when the "
        "machine is quiet, 3-12 s under load",
    "test_kernels_concurrent.py::test_cooperative_launch_completes_and_equals_the_rule":
        "a grid's programs as threads of Triton's interpreter, 3 ratios: 7-27 s each",
    "test_kernels_concurrent.py::test_a_kernel_without_one_wait_or_buffer_swap_fails":
        "mutants under a slow adversarial schedule: 10-53 s each",
    "test_llava_onevision.py::test_eager_and_sdpa_attention_give_the_same_results":
        "loads the eager model too: 5 s (load average 3)",
}


def _slow_key(item) -> tuple:
    """(file::function, file::function[params]) of a collected test, file relative to tests/."""
    file = os.path.relpath(str(item.path), os.path.dirname(__file__)).replace(os.sep, "/")
    function = getattr(item, "originalname", None) or item.name
    return f"{file}::{function}", f"{file}::{item.name}"


def pytest_collection_modifyitems(items):
    for item in items:
        for key in _slow_key(item):
            if key in SLOW_TESTS:
                item.add_marker(pytest.mark.slow(reason=SLOW_TESTS[key]))
