"""Paired comparison of two accuracies measured on the same points.

McNemar's test (McNemar, Psychometrika 12(2), 1947, "Note on the sampling error of the difference
between correlated proportions or percentages"): of the points where the two per-point outcomes
differ, ``b`` favour A and ``c`` favour B; under H0 (equal accuracies) each such discordant point
is a fair coin. Concordant points carry no information, which is why a paired test separates
accuracies that overlapping confidence intervals cannot.

* ``b + c < 25``: exact two-sided binomial p-value, ``scipy.stats.binomtest(b, b + c, 0.5)``;
* otherwise the chi-square statistic with continuity correction (Edwards, Psychometrika 1948),
  ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom.

Several comparisons at once (one per method in a leaderboard column) are corrected with Holm's
step-down method (Holm, Scandinavian Journal of Statistics 6(2), 1979).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

EXACT_BELOW = 25  # discordant pairs under which the exact binomial form is used


@dataclass(frozen=True)
class McNemar:
    """``b``: points where only A is correct/robust; ``c``: only B; ``n``: paired points; ``p``:
    two-sided p-value; ``exact``: whether ``p`` is the exact binomial one."""

    b: int
    c: int
    n: int
    p: float
    exact: bool


def _as_bools(flags: str | Sequence[bool]) -> list[bool]:
    if isinstance(flags, str):
        if set(flags) - {"0", "1"}:
            raise ValueError("per-point flags must be a string of 0/1 characters")
        return [ch == "1" for ch in flags]
    return [bool(f) for f in flags]


def mcnemar(a: str | Sequence[bool], b: str | Sequence[bool]) -> McNemar:
    """McNemar's test of per-point outcomes ``a`` and ``b`` (``0``/``1`` strings as the records keep
    them, or booleans; 1 = correct/robust) of two models on the same points, in the same order.
    Raises ValueError if the two cover different numbers of points."""
    from scipy import stats

    fa, fb = _as_bools(a), _as_bools(b)
    if len(fa) != len(fb):
        raise ValueError(f"paired outcomes of different lengths ({len(fa)} vs {len(fb)}); compare records of one preset")
    only_a = sum(x and not y for x, y in zip(fa, fb))
    only_b = sum(y and not x for x, y in zip(fa, fb))
    k = only_a + only_b
    if k == 0:
        return McNemar(0, 0, len(fa), 1.0, True)
    if k < EXACT_BELOW:
        return McNemar(only_a, only_b, len(fa), float(stats.binomtest(only_a, k, 0.5).pvalue), True)
    chi2 = (abs(only_a - only_b) - 1) ** 2 / k
    return McNemar(only_a, only_b, len(fa), float(stats.chi2.sf(chi2, 1)), False)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order (compare each with alpha directly)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def ties_with_best(outcomes: dict[str, str], accuracy: dict[str, float], alpha: float = 0.05) -> tuple[str, dict[str, float]]:
    """The best of ``accuracy`` (``{name: fraction}``; ties go to the first name in sorted order) and
    the others whose per-point ``outcomes`` it does not beat: ``{name: Holm-adjusted McNemar p}`` for
    every name with adjusted p >= ``alpha``. Needs at least two names; raises ValueError otherwise."""
    if len(accuracy) < 2:
        raise ValueError("a comparison needs at least two methods")
    best = max(sorted(accuracy), key=lambda m: accuracy[m])
    others = [m for m in sorted(accuracy) if m != best]
    adjusted = holm([mcnemar(outcomes[best], outcomes[m]).p for m in others])
    return best, {m: p for m, p in zip(others, adjusted) if p >= alpha}
