"""Without CUDA, the Triton kernels run under Triton's interpreter in the tests.

``TRITON_INTERPRET`` is read when ``triton`` is imported (kernels decorated then become
interpreted functions), so it is set here, before any test module imports triton.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py ran"
    os.environ["TRITON_INTERPRET"] = "1"
