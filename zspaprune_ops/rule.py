"""Constants and arithmetic of the ZSPAPrune rule, shared by the reference and the kernels.

Selection keys are float32. Real cosine scores lie in [-1, 1] and cosine distances in [0, 2]
(up to rounding), so the sentinels below rank every demoted or padded token after every real
one without a second sort key.
"""
import math

NORM_EPS = 1e-12
"""Norms are clamped to at least this before dividing: a zero vector stays zero."""

DEMOTED = -2.0
"""Key of a real token that cannot be scored: its float32 norm is NaN or Inf (non-finite
features, or a sum of squares that overflows float32), or its relevance is NaN (a non-finite
prompt). Such tokens are taken only after every scorable real token, lowest index first."""

PADDING = -3.0
"""Key of a padded token (visual_mask False). Reached only when value checks are off and
``keep`` exceeds a row's real tokens; the picks then stay distinct and in range."""


def core_size(keep: int, relevance_ratio: float) -> int:
    """Tokens in the relevance core: ``floor(keep * relevance_ratio + 0.5)``, in float64."""
    return math.floor(keep * relevance_ratio + 0.5)


def may_start_with_divprune(prompt_len: int, keep: int, relevance_ratio: float,
                            has_prompt_mask: bool) -> bool:
    """Whether some row may have an empty core, and so start with DivPrune's first pick; decided
    from metadata alone (a prompt mask may leave a row without a real prompt token)."""
    return has_prompt_mask or prompt_len == 0 or core_size(keep, relevance_ratio) == 0
