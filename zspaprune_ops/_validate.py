"""Input checks shared by the op, the wrapper, the reference and the kernels.

Shape, dtype and device checks read only metadata and cost nothing. The one check that reads
values (``keep`` against the number of real tokens in each row of ``visual_mask``) forces a
device-to-host sync on CUDA; it is skipped during CUDA-graph capture and whenever
``set_value_checks(False)`` is in effect.
"""
import contextlib
import operator
from dataclasses import dataclass
from numbers import Real
from typing import Optional

import torch

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The supported feature dtypes by name (command lines and benchmarks use the names)."""
_value_checks = True


def set_value_checks(enabled: bool) -> bool:
    """Turn the value check (``keep`` <= real tokens per row) on or off; returns the old setting.

    With it off, no call syncs with the device. A row with fewer real tokens than ``keep``
    then gets all its real tokens plus padded ones, lowest index first (still distinct).
    """
    global _value_checks
    previous, _value_checks = _value_checks, bool(enabled)
    return previous


def value_checks_enabled() -> bool:
    """Whether checks that read values (and sync with the device) run: see set_value_checks."""
    return _value_checks


@dataclass
class Batch:
    """Validated inputs viewed as a batch: visual [B, N, D], prompt [B, T, D], masks [B, *],
    ``keep`` as a Python int (or SymInt)."""

    visual: torch.Tensor
    prompt: torch.Tensor
    prompt_mask: Optional[torch.Tensor]
    visual_mask: Optional[torch.Tensor]
    unbatched: bool
    keep: int


def _check_features(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FEATURE_DTYPES.values():
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def _check_mask(name: str, mask, shape: tuple, device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but visual is on {device}")


def check_inputs(visual, prompt, keep, relevance_ratio, prompt_mask=None, visual_mask=None,
                 *, allow_unbatched: bool = True) -> Batch:
    """Check everything that metadata alone can tell; return the inputs as a batch.

    Raises TypeError for wrong types or dtypes and ValueError for wrong shapes, devices and
    values of ``keep`` / ``relevance_ratio``; each message names the offending argument.
    """
    _check_features("visual", visual)
    _check_features("prompt", prompt)
    ranks = (3, 2) if allow_unbatched else (3,)
    expected = "[B, N, D] or unbatched [N, D]" if allow_unbatched else "[B, N, D]"
    if visual.dim() not in ranks:
        raise ValueError(f"visual must be {expected}, got shape {list(visual.shape)}")
    if prompt.dim() != visual.dim():
        raise ValueError(f"prompt must have rank {visual.dim()} like visual "
                         f"([B, T, D] or unbatched [T, D]), got shape {list(prompt.shape)}")
    if prompt.device != visual.device:
        raise ValueError(f"prompt is on {prompt.device} but visual is on {visual.device}")
    unbatched = visual.dim() == 2
    if unbatched:
        visual, prompt = visual.unsqueeze(0), prompt.unsqueeze(0)
        prompt_mask = _unsqueeze_mask("prompt_mask", prompt_mask, 1)
        visual_mask = _unsqueeze_mask("visual_mask", visual_mask, 1)
    B, N, D = visual.shape
    if prompt.shape[0] != B:
        raise ValueError(f"prompt has batch size {prompt.shape[0]} but visual has {B}")
    if prompt.shape[2] != D:
        raise ValueError(f"prompt has feature size {prompt.shape[2]} but visual has {D}")
    if N == 0 or D == 0:
        raise ValueError(f"visual must have at least one token and one feature, got shape "
                         f"{list(visual.shape)}")
    _check_mask("prompt_mask", prompt_mask, tuple(prompt.shape[:2]), visual.device)
    _check_mask("visual_mask", visual_mask, (B, N), visual.device)
    keep = check_budget(keep, relevance_ratio)
    if not 1 <= keep <= N:
        raise ValueError(f"keep must be in [1, N={int(N)}], got {int(keep)}")  # int(): traceable
    return Batch(visual, prompt, prompt_mask, visual_mask, unbatched, keep)


def check_budget(keep, relevance_ratio):
    """Check ``keep`` (its range depends on N: see check_inputs) and ``relevance_ratio`` (a
    number in [0, 1]); returns ``keep`` as a Python int.

    ``keep`` may be anything integer-like (``operator.index``: int, ``numpy.int64``, ...) except
    a bool or a tensor (a tensor would hide a device sync). SymInt / SymFloat pass unchanged, so
    torch.compile can trace them symbolically.
    """
    if not isinstance(keep, torch.SymInt):
        keep = _as_int(keep)
    if isinstance(relevance_ratio, bool) or not isinstance(relevance_ratio, (Real, torch.SymFloat)):
        raise TypeError(f"relevance_ratio must be a float, got {type(relevance_ratio).__name__}")
    if not 0.0 <= relevance_ratio <= 1.0:  # False for NaN too
        raise ValueError(f"relevance_ratio must be in [0, 1], got {float(relevance_ratio)}")
    return keep


def _as_int(keep) -> int:
    if not isinstance(keep, (bool, torch.Tensor)):
        with contextlib.suppress(TypeError):
            return operator.index(keep)
    raise TypeError(f"keep must be an int, got {type(keep).__name__}")


def _unsqueeze_mask(name: str, mask, dim_expected: int):
    if isinstance(mask, torch.Tensor) and mask.dim() != dim_expected:
        raise ValueError(f"{name} must be 1-D for unbatched inputs, got shape {list(mask.shape)}")
    return mask.unsqueeze(0) if isinstance(mask, torch.Tensor) else mask


def check_real_counts(visual_mask: Optional[torch.Tensor], keep: int) -> None:
    """Raise ValueError if a row of ``visual_mask`` has fewer than ``keep`` real tokens.

    Reads values: one device-to-host sync on CUDA. Skipped when value checks are off and
    during CUDA-graph capture.
    """
    if visual_mask is None or not _value_checks:
        return
    if visual_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    fewest = int(visual_mask.sum(dim=1).min())
    if fewest < keep:
        raise ValueError(f"keep={keep} exceeds the real tokens in a row of visual_mask "
                         f"(fewest: {fewest}); lower keep or fix the mask")
