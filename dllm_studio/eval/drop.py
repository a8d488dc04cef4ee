"""How much worse a quantized model scores than full precision, in the seed study's words.

arXiv:2508.14896 reports the relative drop against full precision and reads it in three bands: under 1 %
negligible, 1-4 % moderate, over 4 % significant.
"""

from __future__ import annotations

BANDS = ((0.01, "negligible"), (0.04, "moderate"), (float("inf"), "significant"))


def relative_drop(fp: float, q: float, lower_is_better: bool = False) -> float | None:
    """How much worse `q` is than `fp`, as a fraction of `fp`; None when that is undefined (fp is 0).

    Accuracy: (fp - q) / fp. A loss such as NLL per token (lower is better): (q - fp) / fp.
    """
    if fp == q:
        return 0.0
    if fp == 0:
        return None
    return (q - fp) / fp if lower_is_better else (fp - q) / fp


def band(drop: float) -> str:
    """The seed study's name for a relative drop (a gain counts as negligible)."""
    return next(name for limit, name in BANDS if drop <= limit)
