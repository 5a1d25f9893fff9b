"""vLLM's tensor parallelism (``tensor_parallel_size=2`` on vllm-cpu) with the plugin's LLaVA
and Qwen2.5-VL models: both ranks keep the same tokens of every image, the HF wrapper's, and
the greedy answers are the HF wrapper's (so TP=1's, which the other engine tests compare with
it).

vllm-cpu binds each rank's threads to a NUMA node of its own by default and refuses two ranks
on a one-node machine ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"):
the test binds rank 0 to core 0 and rank 1 to core 1 (``VLLM_CPU_OMP_THREADS_BIND="0|1"``),
as a user of such a machine must.
"""
import os
from unittest import mock

import pytest

pytest.importorskip("vllm")

from plugin_helpers import Engine, HFReference, checkpoint, image  # noqa: E402
import qwen_helpers  # noqa: E402

KEEP = {"llava": 8, "qwen2_5_vl": 5}
pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two ranks need two cores")


@pytest.fixture(scope="module", params=list(KEEP))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory, kind):
    if kind == "llava":
        return checkpoint(tmp_path_factory, kind)
    return qwen_helpers.checkpoint(tmp_path_factory, kind)


@pytest.fixture(scope="module")
def llm(folder, kind):
    binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    with mock.patch.dict(os.environ, {"VLLM_CPU_OMP_THREADS_BIND": binding}):
        started = Engine(folder, kind, KEEP[kind], tensor_parallel_size=2,
                         limit_mm_per_prompt={"image": 2})
    yield started
    started.shutdown()


def expected(folder, kind):
    """The requests and, per request, (each image's prompt ids, kept positions per image,
    greedy new tokens) from the HF wrapper."""
    if kind == "llava":
        hf = HFReference(folder, KEEP[kind])
        prompts = ["USER: <image> What is shown in the image? ASSISTANT:",
                   "USER: <image><image> Where is the cat? ASSISTANT:"]

        def answer(prompt, pictures):
            reference = hf.run(prompt, pictures)
            return reference.prompt_ids, reference.kept, reference.tokens
    else:
        hf = qwen_helpers.QwenReference(folder, KEEP[kind])
        prompts = [hf.prompt("What is shown in the image?"), hf.prompt("Where is the cat?", 2)]

        def answer(prompt, pictures):
            _, kept, tokens, _, prompt_ids = hf.run(prompt, pictures)
            return prompt_ids, kept, tokens
    requests = [(prompts[0], [image(48, 40, 1)]),
                (prompts[1], [image(64, 32, 2), image(32, 56, 3)])]
    return requests, [answer(*request) for request in requests]


def test_both_ranks_keep_the_hf_wrappers_tokens_and_answer_as_it_does(llm, folder, kind):
    requests, answers = expected(folder, kind)
    tokens = llm.tokens(requests)
    ranks = [llm.selections(rank) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    for (prompt_ids, kept, answer), generated in zip(answers, tokens):
        for key, mine in zip(prompt_ids, kept):
            assert mine in ranks[0][key], (mine, ranks[0][key])
        assert generated == answer
