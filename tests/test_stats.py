"""McNemar's test, Holm's correction and the per-column ties of a leaderboard (pytest_advprune.stats)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from pytest_advprune.stats import holm, mcnemar, ties_with_best


def flags(only_a: int, only_b: int, both: int = 0, neither: int = 0) -> tuple[str, str]:
    """Paired 0/1 strings with the given discordant (and concordant) counts."""
    a = "1" * only_a + "0" * only_b + "1" * both + "0" * neither
    b = "0" * only_a + "1" * only_b + "1" * both + "0" * neither
    return a, b


def test_exact_binomial_known_value():
    # b = 1, c = 9: p = 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11 / 1024
    r = mcnemar(*flags(1, 9, both=50, neither=40))
    assert (r.b, r.c, r.n, r.exact) == (1, 9, 100, True)
    assert r.p == pytest.approx(22 / 1024, rel=1e-12)


def test_exact_symmetric_and_balanced():
    assert mcnemar(*flags(5, 5)).p == pytest.approx(1.0)
    assert mcnemar(*flags(0, 6)).p == pytest.approx(2 / 64)
    assert mcnemar(*flags(6, 0)).p == mcnemar(*flags(0, 6)).p


def test_chi_square_with_continuity_correction_known_value():
    # b = 30, c = 10: chi2 = (|30 - 10| - 1)^2 / 40 = 9.025; 1-df survival = erfc(sqrt(chi2 / 2))
    r = mcnemar(*flags(30, 10, both=500))
    assert not r.exact
    assert r.p == pytest.approx(math.erfc(math.sqrt(9.025 / 2)), rel=1e-9)
    assert r.p == pytest.approx(0.002663, abs=5e-6)


def test_no_discordant_points_means_no_difference():
    r = mcnemar("1100", "1100")
    assert (r.b, r.c, r.p) == (0, 0, 1.0)


def test_booleans_and_strings_agree_and_bad_input_is_refused():
    a, b = flags(3, 8, both=4)
    assert mcnemar(a, b) == mcnemar([c == "1" for c in a], [c == "1" for c in b])
    with pytest.raises(ValueError, match="lengths"):
        mcnemar("101", "10")
    with pytest.raises(ValueError, match="0/1"):
        mcnemar("1x1", "101")


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40))
def test_p_value_is_a_probability_and_symmetric(b, c):
    r = mcnemar(*flags(b, c, both=3))
    assert 0.0 <= r.p <= 1.0
    assert r.p == pytest.approx(mcnemar(*flags(c, b, both=3)).p)


def test_holm_known_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1, and never below a smaller p's adjusted value
    assert holm([0.02, 0.3]) == pytest.approx([0.04, 0.3])


def test_ties_with_best():
    n = 200
    best = "1" * 150 + "0" * 50
    close = "1" * 148 + "0" * 52          # 2 discordant points: not distinguishable
    far = "1" * 100 + "0" * 100           # 50 discordant points, all favouring best
    outcomes = {"a": close, "b": best, "c": far}
    accuracy = {m: f.count("1") / n for m, f in outcomes.items()}
    top, ties = ties_with_best(outcomes, accuracy)
    assert top == "b"
    assert list(ties) == ["a"] and ties["a"] == pytest.approx(0.5)  # 2 discordant points, both for b: p = 2 / 4
    with pytest.raises(ValueError):
        ties_with_best({"a": close}, {"a": 0.7})
