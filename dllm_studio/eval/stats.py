"""Small-sample statistics for comparing two models on the same items, in pure Python.

A suite of a few dozen items cannot tell a 2 % drop from noise, so every accuracy gets a 95 % interval
and every full-precision-vs-quantized difference a paired test. The formulas:

- Wilson score interval for a proportion: E. B. Wilson (1927), "Probable inference, the law of
  succession, and statistical inference", JASA 22, 209-212. It stays inside [0, 1] and keeps its
  coverage at small n and at 0 % or 100 %, where the textbook (Wald) interval collapses to a point.
- Exact McNemar test: on the same items only the discordant pairs carry information about a difference;
  under "no difference" each discordant item is equally likely to favour either model, so the count
  one way is Binomial(b + c, 1/2) (McNemar 1947; the exact form as in Fagerland, Lydersen & Laake (2013),
  "The McNemar test for binary matched-pairs data", BMC Med Res Methodol 13:91).
- Interval for a paired difference of proportions: Newcombe's square-and-add interval from the two
  Wilson intervals with a continuity-corrected correlation term, R. G. Newcombe (1998), "Improved
  confidence intervals for the difference between binomial proportions based on paired data",
  Statistics in Medicine 17, 2635-2650 (method 10). Unlike the Wald interval it behaves at n = 5 and
  when no item differs.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: two-sided 95 %
ALPHA = 0.05


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (low, high) for `k` successes in `n` trials; (0, 1) when n is 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At k = 0 or k = n one limit is exactly 0 or 1; the formula leaves rounding dust there.
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of `k` out of `n` under Binomial(n, 1/2): twice the smaller tail, at most 1.

    The sign test; exact integer arithmetic, so it holds for any n without underflow.
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 1.0
    tail, term = 0, 1  # term = C(n, i)
    for i in range(min(k, n - k) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2**n)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: `b` items only the first model got right,
    `c` only the second."""
    return binomial_two_sided(b, b + c)


def paired_difference_interval(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's (1998, method 10) 95 % interval for p1 - p2 on paired binary outcomes.

    a: both right, b: only the first right, c: only the second right, d: both wrong;
    p1 = (a + b) / n, p2 = (a + c) / n, so p1 - p2 = (b - c) / n.
    """
    n = a + b + c + d
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if margins:  # the correlation of the two proportions, continuity-corrected towards 0
        cross = a * d - b * c
        corrected = cross - n / 2 if cross > n / 2 else (0 if cross >= 0 else cross)
        phi = corrected / math.sqrt(margins)
    low = (p1 - p2) - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = (p1 - p2) + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return max(low, -1.0), min(high, 1.0)
