r"""The statistics the claims are decided by, on paired per-seed differences (every function takes plain
lists of floats, so the committed JSON's per-seed numbers are all a reader needs to recompute them).

For differences d_1..d_n (n seeds), mean d̄, sample standard deviation s, standard error s/√n and
Student's t with n − 1 degrees of freedom:

- :func:`one_sided_p`: p of H0 "mean ≤ 0" against "mean > 0", P(T_{n−1} ≥ d̄/(s/√n)).
- :func:`holm`: Holm's step-down adjustment of a family of p-values (controls the family-wise error).
- :func:`tost_p`: the two one-sided tests of equivalence within ±δ, max(P(T ≥ (d̄+δ)/se), P(T ≤ (d̄−δ)/se));
  p < α iff the (1 − 2α) interval of the mean lies inside (−δ, δ).
- :func:`interval`: the two-sided t interval of the mean.
- :func:`fieller`: the interval of a ratio of two paired means (Fieller's theorem).
- :func:`seeds_to_decide`: the n at which a test would reach its level with 80% power if the observed
  mean and standard deviation were the truth.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

from scipy import stats as _scipy_stats

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 1000  # seeds_to_decide gives up beyond this


def t_quantile(prob: float, df: int) -> float:
    """The ``prob`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(_scipy_stats.t.ppf(prob, df))


def t_sf(x: float, df: int) -> float:
    """P(T_df ≥ x)."""
    return float(_scipy_stats.t.sf(x, df))


def summary(d: list) -> dict:
    """n, mean, sd (n − 1) and standard error of the differences ``d`` (sd and se None when n < 2)."""
    n = len(d)
    mean = statistics.fmean(d) if d else None
    sd = statistics.stdev(d) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd, "se": sd / math.sqrt(n) if sd is not None else None}


def _t_stat(mean: float, se: float) -> float:
    """mean / se, with ±inf (or 0) when every difference is the same (se = 0)."""
    if se > 0:
        return mean / se
    return math.copysign(math.inf, mean) if mean else 0.0


def one_sided_p(d: list) -> Optional[float]:
    """p of the paired t-test of H0 "mean ≤ 0" against "mean > 0"; None when n < 2."""
    s = summary(d)
    if s["n"] < 2:
        return None
    return t_sf(_t_stat(s["mean"], s["se"]), s["n"] - 1)


def tost_p(d: list, delta: float) -> Optional[float]:
    """p of the two one-sided tests of H0 "|mean| ≥ δ" against "|mean| < δ"; None when n < 2."""
    s = summary(d)
    if s["n"] < 2:
        return None
    df = s["n"] - 1
    above = t_sf(_t_stat(s["mean"] + delta, s["se"]), df)  # H0: mean ≤ −δ
    below = t_sf(_t_stat(delta - s["mean"], s["se"]), df)  # H0: mean ≥ +δ
    return max(above, below)


def interval(d: list, level: float = 0.95) -> Optional[tuple]:
    """The two-sided ``level`` t interval of the mean; None when n < 2."""
    s = summary(d)
    if s["n"] < 2:
        return None
    half = t_quantile(0.5 + level / 2, s["n"] - 1) * s["se"]
    return (s["mean"] - half, s["mean"] + half)


def holm(pvalues: list) -> list:
    """Holm's adjusted p-values, in the order given: the i-th smallest p times (m − i + 1), made
    non-decreasing along the sorted order and capped at 1 (a p of None stays None and is not counted)."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(present)
    adjusted = [None] * len(pvalues)
    running = 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def fieller(num: list, den: list, level: float = 0.95) -> Optional[dict]:
    r"""The ratio ρ = mean(num)/mean(den) of paired samples and its ``level`` interval by Fieller's
    theorem: the ρ with (n̄ − ρ d̄)² ≤ t² (s_nn − 2ρ s_nd + ρ² s_dd)/n, t the two-sided t quantile with
    n − 1 degrees of freedom. ``{"ratio", "low", "high"}``; low and high are None when the interval is
    unbounded (the denominator's mean is not significantly different from 0). None when n < 2 or the
    denominator's mean is 0."""
    n = len(num)
    if n < 2 or len(den) != n:
        return None
    mn, md = statistics.fmean(num), statistics.fmean(den)
    if md == 0:
        return None
    snn = statistics.variance(num)
    sdd = statistics.variance(den)
    snd = statistics.covariance(num, den)
    t2 = t_quantile(0.5 + level / 2, n - 1) ** 2
    a = md * md - t2 * sdd / n
    b = -2.0 * (mn * md - t2 * snd / n)
    c = mn * mn - t2 * snn / n
    ratio = mn / md
    disc = b * b - 4 * a * c
    if a <= 0 or disc < 0:
        return {"ratio": ratio, "low": None, "high": None}
    root = math.sqrt(disc)
    return {"ratio": ratio, "low": (-b - root) / (2 * a), "high": (-b + root) / (2 * a)}


def seeds_to_decide(sd: Optional[float], gap: float, alpha: float, power: float = POWER) -> Optional[int]:
    """The smallest n ≥ 2 with (t_{1−α, n−1} + t_{power, n−1})·sd/√n ≤ gap: the seeds a one-sided
    test at level α needs to detect a mean ``gap`` away from its boundary with the given power, if
    the standard deviation is ``sd``. None when gap ≤ 0 (no n decides it that way) or past
    :data:`MAX_SEEDS`."""
    if sd is None or gap <= 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if (t_quantile(1 - alpha, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n) <= gap:
            return n
    return None
