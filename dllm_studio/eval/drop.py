"""How much worse a quantized model scores than full precision, in the seed study's words, and whether the
items support saying so.

arXiv:2508.14896 reports the relative drop against full precision and reads it in three bands: under 1 %
negligible, 1-4 % moderate, over 4 % significant. On a handful of items one flipped answer is a 20 % "drop",
so the band is only named when a paired test on the same items tells the difference from zero
(p < 0.05, see `dllm_studio.eval.stats`); otherwise the verdict reads "not significant at n = ...".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dllm_studio.eval.stats import ALPHA, binomial_two_sided, mcnemar_exact, paired_difference_interval, wilson

if TYPE_CHECKING:
    from dllm_studio.eval.runner import EvalResult

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


@dataclass(frozen=True)
class DropStats:
    """Full precision against quantized on the same `n` items.

    `fp_interval`/`q_interval`: 95 % Wilson intervals of the accuracies (None for a likelihood).
    `drop`: `relative_drop`; `drop_interval`: its 95 % interval (None where there is none).
    `p_value`: two-sided, from the paired test `test` names (with the counts it used).
    `band`: the seed study's band, or None when the test cannot tell the drop from zero.
    `verdict`: what to show: the band, "not significant at n = N", or why there is no drop.
    """
    n: int
    fp_interval: tuple[float, float] | None
    q_interval: tuple[float, float] | None
    drop: float | None
    drop_interval: tuple[float, float] | None
    p_value: float
    test: str  # which paired test gave p_value
    band: str | None
    verdict: str


def _verdict(drop: float | None, p_value: float, n: int) -> tuple[str | None, str]:
    if n == 0:
        return None, "n/a (no item scored)"
    if drop is None:
        return None, "n/a (full precision scored 0)"
    if p_value < ALPHA:
        return band(drop), band(drop)
    return None, f"not significant at n = {n}"


def accuracy_drop(fp_correct: Sequence[bool], q_correct: Sequence[bool]) -> DropStats:
    """Paired comparison of per-item correctness (the same items, in the same order).

    The relative drop's interval is Newcombe's paired-difference interval for p_fp - p_q (see
    `stats.paired_difference_interval`) divided by the observed full-precision accuracy, the same scaling
    that turns the difference into the relative drop; it treats that accuracy as the fixed reference, as the
    seed study's relative drop does. The p-value is the exact McNemar test on the items that differ.
    """
    if len(fp_correct) != len(q_correct):
        raise ValueError(f"paired results need the same items: {len(fp_correct)} vs {len(q_correct)}")
    n = len(fp_correct)
    pairs = list(zip(map(bool, fp_correct), map(bool, q_correct)))
    both, fp_only, q_only = pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True))
    neither = n - both - fp_only - q_only
    fp_right, q_right = both + fp_only, both + q_only
    drop = relative_drop(fp_right / n, q_right / n) if n else None
    interval = None
    if drop is not None and fp_right:  # both at 0 % is "no drop", but no interval scales by a zero accuracy
        low, high = paired_difference_interval(both, fp_only, q_only, neither)
        interval = (low / (fp_right / n), high / (fp_right / n))
    p = mcnemar_exact(fp_only, q_only)
    named, verdict = _verdict(drop, p, n)
    return DropStats(n, wilson(fp_right, n), wilson(q_right, n), drop, interval, p,
                     f"exact McNemar ({fp_only} only FP right, {q_only} only Q right)", named, verdict)


def nll_drop(fp_nll: Sequence[float], q_nll: Sequence[float]) -> DropStats:
    """Paired comparison of per-item NLL (lower is better), the same items in the same order.

    A likelihood is no proportion, so there is no Wilson interval, and the per-item NLLs of a few sentences
    are too few and too skewed for a t interval to be trusted: no interval for the drop. The p-value is an
    exact sign test on the items whose NLL changed (quantized worse vs better; ties dropped), so the band is
    only named when most sentences moved the same way.
    """
    if len(fp_nll) != len(q_nll):
        raise ValueError(f"paired results need the same items: {len(fp_nll)} vs {len(q_nll)}")
    n = len(fp_nll)
    worse = sum(q > fp for fp, q in zip(fp_nll, q_nll))
    better = sum(q < fp for fp, q in zip(fp_nll, q_nll))
    fp_mean, q_mean = (math.fsum(fp_nll) / n, math.fsum(q_nll) / n) if n else (0.0, 0.0)
    drop = relative_drop(fp_mean, q_mean, lower_is_better=True) if n else None
    p = binomial_two_sided(worse, worse + better)
    named, verdict = _verdict(drop, p, n)
    return DropStats(n, None, None, drop, None, p, f"sign test ({worse} worse, {better} better)", named, verdict)


def compare_results(fp: EvalResult, q: EvalResult) -> DropStats:
    """`accuracy_drop` (or `nll_drop` for the text suite) of two evaluations of the same suite items."""
    if [r.id for r in fp.records] != [r.id for r in q.records]:
        raise ValueError(f"{fp.suite}: the two evaluations did not score the same items")
    if fp.accuracy is None:  # text: the sentences with a likelihood on both sides (a too-short one has none)
        scored = [(a.nll_per_token, b.nll_per_token) for a, b in zip(fp.records, q.records)
                  if a.nll_per_token is not None and b.nll_per_token is not None]
        return nll_drop([a for a, _ in scored], [b for _, b in scored])
    return accuracy_drop([r.correct for r in fp.records], [r.correct for r in q.records])
