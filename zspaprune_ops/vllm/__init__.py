"""ZSPAPrune inside vLLM: an out-of-tree model plugin for LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and
Qwen3-VL.

``pip install zspaprune[vllm]`` registers this plugin under vLLM's ``vllm.general_plugins``
entry point. Select a pruned model by overriding its architecture; the pruning settings are
config keys, set the same way (or written into the checkpoint's ``config.json``)::

    from vllm import LLM
    llm = LLM(model="llava-hf/llava-1.5-7b-hf", hf_overrides={
        "architectures": ["ZSPAPruneLlavaForConditionalGeneration"],
        "zspaprune_keep": 64, "zspaprune_relevance_ratio": 0.5,
        "zspaprune_prompt": "message"})

Each image then takes ``keep`` placeholder tokens in the prompt (fewer if it has fewer visual
tokens), so scheduling, the KV cache and the encoder cache all see the pruned size. Each
image's relevance prompt is the text of the user message holding it (``zspaprune_prompt``:
``"message"``, the default, or ``"all"``; see docs/prompt.md), and only that text goes into the
image's multimodal hash, so an image keeps its hash (and the prefix cache) across turns.
"""
KEEP_KEY = "zspaprune_keep"
RATIO_KEY = "zspaprune_relevance_ratio"
PROMPT_KEY = "zspaprune_prompt"
ARCHITECTURES = {
    "ZSPAPruneLlavaForConditionalGeneration": "LlavaForConditionalGeneration",
    "ZSPAPruneLlavaNextForConditionalGeneration": "LlavaNextForConditionalGeneration",
    "ZSPAPruneQwen2_5_VLForConditionalGeneration": "Qwen2_5_VLForConditionalGeneration",
    "ZSPAPruneQwen3VLForConditionalGeneration": "Qwen3VLForConditionalGeneration",
}
"""Architecture names this plugin registers, each with the vLLM model it prunes."""
MODULES = {"Qwen2_5_VLForConditionalGeneration": "qwen",
           "Qwen3VLForConditionalGeneration": "qwen"}
"""The module of ``zspaprune_ops.vllm`` defining a pruned model (default: ``models``)."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the pruned architectures (lazily, so
    vLLM imports the model module only in the processes that build the model)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES:
        module = MODULES.get(ARCHITECTURES[name], "models")
        ModelRegistry.register_model(name, f"zspaprune_ops.vllm.{module}:{name}")


__all__ = ["ARCHITECTURES", "KEEP_KEY", "PROMPT_KEY", "RATIO_KEY", "register"]
