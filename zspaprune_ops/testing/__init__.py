"""Tools for tests, benchmarks and examples: tiny offline models and measurement.

Nothing here is needed to prune a model; the library never imports this package (the demo and
``zspaprune eval`` use ``measure``). Submodules are imported on their own, so that this package
costs nothing until one is used:

- ``zspaprune_ops.testing.tiny_llava``: ``build_tiny_llava(folder, kind="llava" |
  "llava_next")`` saves a tiny random-weight LLaVA / LLaVA-NeXT with its tokenizer, processor and
  chat template, loadable offline with ``from_pretrained(folder)``; ``build_model(**sizes)``
  builds one in memory (``LLAVA_15_7B_SIZES``: LLaVA-1.5-7B's shapes, for benchmarks).
- ``zspaprune_ops.testing.tiny_qwen``: the same for Qwen2.5-VL / Qwen3-VL
  (``build_tiny_qwen``), plus ``encode`` (what a Qwen processor returns, without torchvision)
  and ``video_inputs``.
- ``zspaprune_ops.testing.common``: what every builder shares (``instantiate``: a seeded model
  with re-drawn weights; ``train_bpe``: an offline tokenizer). A builder for a new family
  goes in its own ``tiny_<family>.py`` and uses these.
- ``zspaprune_ops.testing.measure``: wall-clock medians taken in turns, peak tensor memory of a
  call (CUDA, or the CPU profiler's timeline), and the environment fields of results rows.

The builders need the ``[hf]`` extra (transformers, tokenizers, Pillow); ``measure`` only torch.
Every builder is deterministic: the same arguments give the same weights.
"""
