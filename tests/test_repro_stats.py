"""The statistics of the reproduction's verdicts (repro/stats.py, repro/report.py): t quantiles against
printed tables, Holm's adjustment, TOST against its interval form, Fieller's interval, the seeds a test
needs, and the verdict rules on synthetic per-seed results."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from repro import report, stats  # noqa: E402


@pytest.mark.parametrize("prob, df, value", [
    (0.975, 1, 12.7062), (0.975, 4, 2.7764), (0.95, 4, 2.1318), (0.95, 1, 6.3138), (0.975, 30, 2.0423),
    (0.8, 4, 0.9410), (0.5, 7, 0.0),
])
def test_t_quantiles_match_the_tables(prob, df, value):
    assert stats.t_quantile(prob, df) == pytest.approx(value, abs=1e-4)
    assert stats.t_sf(value, df) == pytest.approx(1 - prob, abs=1e-5)


def test_one_sided_p_and_interval():
    d = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd √2.5, se √0.5, t = 3/√0.5 on 4 df
    x = 3 / math.sqrt(0.5) / math.sqrt(4 + 18)  # the closed form of Student's 4-df tail: ½ − ½x(1 + (1 − x²)/2)
    assert stats.one_sided_p(d) == pytest.approx(0.5 - 0.5 * x * (1 + (1 - x * x) / 2), rel=1e-9)
    low, high = stats.interval(d, 0.95)
    assert (low, high) == pytest.approx((3 - 2.7764 * math.sqrt(0.5), 3 + 2.7764 * math.sqrt(0.5)), abs=1e-3)
    assert stats.one_sided_p([1.0]) is None and stats.interval([1.0]) is None
    assert stats.one_sided_p([2.0, 2.0]) == 0.0 and stats.one_sided_p([-2.0, -2.0]) == 1.0  # se = 0


def test_holm():
    # sorted 0.01, 0.02, 0.03, 0.04 -> 0.04, 0.06, 0.06 (monotone), 0.06; None is not counted
    assert stats.holm([0.03, 0.01, None, 0.04, 0.02]) == pytest.approx([0.06, 0.04, None, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]


@pytest.mark.parametrize("d", [[0.5, -0.3, 0.2, 0.1, -0.1], [1.0, 2.5, 0.5, 1.8, 1.2], [-3.0, 2.0, 0.5]])
@pytest.mark.parametrize("delta", [0.5, 2.0, 5.0])
def test_tost_is_the_90_percent_interval_inside_the_margin(d, delta):
    low, high = stats.interval(d, 0.90)
    assert (stats.tost_p(d, delta) < 0.05) == (-delta < low and high < delta)


def test_fieller():
    den = [10.0, 12.0, 9.0, 11.0, 10.5]
    exact = stats.fieller([0.5 * x for x in den], den)  # num = ρ·den exactly: the interval is the point
    assert exact["ratio"] == pytest.approx(0.5) and exact["low"] == pytest.approx(0.5)
    assert exact["high"] == pytest.approx(0.5)
    noisy = stats.fieller([5.5, 5.0, 4.0, 6.5, 5.2], den)
    assert noisy["low"] < noisy["ratio"] < noisy["high"]
    assert stats.fieller([1.0, -2.0, 0.5], [1.0, -1.0, 0.2])["low"] is None  # denominator not significant
    assert stats.fieller([1.0], [1.0]) is None


def test_seeds_to_decide():
    assert stats.seeds_to_decide(1.0, 0.0, 0.05) is None
    n_small, n_large = stats.seeds_to_decide(1.0, 2.0, 0.05), stats.seeds_to_decide(1.0, 0.5, 0.05)
    assert 2 <= n_small < n_large
    # the n found is the first whose noncentral approximation reaches the gap
    n = n_large
    assert (stats.t_quantile(0.95, n - 1) + stats.t_quantile(0.8, n - 1)) / math.sqrt(n) <= 0.5
    assert (stats.t_quantile(0.95, n - 2) + stats.t_quantile(0.8, n - 2)) / math.sqrt(n - 1) > 0.5


def synthetic(test_ppl: dict) -> dict:
    """A results dict with perplexities {method: [per seed]} (lower is better)."""
    runs = [{"method": m, "seed": s, "test_metric": v, "best_val_metric": v, "best_epoch": 1, "steps": 1,
             "train_cpu_seconds": 1.0, "diverged": False}
            for m, values in test_ppl.items() for s, v in enumerate(values)]
    return {"meta": {"higher_is_better": False}, "methods": [{"name": m, "label": m} for m in test_ppl],
            "runs": runs}


def claim(analysis: dict, start: str) -> dict:
    return next(c for c in analysis["claims"] if c["claim"].startswith(start))


def test_verdicts_on_clear_cases():
    result = synthetic({
        "none": [440, 438, 442, 436, 441],
        "dropout": [380, 377, 383, 375, 381],        # gain ≈ 60, δ ≈ 12
        "explicit": [405, 401, 409, 398, 407],       # between: beats none, trails dropout
        "explicit_implicit": [381, 376, 382, 376, 380],  # within ±1 of dropout: matches
        "dropout_k2": [376, 374, 379, 371, 378],     # better than dropout: "dropout beats k2" fails
    })
    analysis = report.analyze(result)
    assert analysis["delta"] == pytest.approx(0.2 * 60.2)
    assert claim(analysis, "R_approx alone")["verdict"] == report.REPRODUCED
    assert claim(analysis, "R_approx + ξ_approx matches")["verdict"] == report.REPRODUCED
    assert claim(analysis, "Adding ξ_approx")["verdict"] == report.REPRODUCED
    degrade = claim(analysis, "DROPOUT_k degrades")
    assert degrade["verdict"] == report.NOT_REPRODUCED
    assert analysis["holm_family"] == 4
    fraction = analysis["fractions"]["explicit"]
    assert fraction["low"] < fraction["ratio"] < fraction["high"] and 0.5 < fraction["ratio"] < 0.6


def test_matches_is_two_sided_and_inconclusive_with_few_seeds():
    much_better = synthetic({"none": [440, 438, 442], "dropout": [380, 377, 383],
                             "explicit_implicit": [340, 338, 341]})
    assert claim(report.analyze(much_better), "R_approx + ξ_approx")["verdict"] == report.NOT_REPRODUCED
    two_seeds = synthetic({"none": [440, 438], "dropout": [380, 377], "explicit_implicit": [375, 388]})
    part = claim(report.analyze(two_seeds), "R_approx + ξ_approx")["comparisons"][0]
    assert part["verdict"] == report.INCONCLUSIVE and part["n_to_decide"] > 2
