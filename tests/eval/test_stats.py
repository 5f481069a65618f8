"""The report's intervals: known values, coverage, and the verdict rule."""

import numpy as np
import pytest

from codetune.eval import stats


@pytest.mark.parametrize("k,n,low,high", [
    (0, 10, 0.0, 3.8415 / 13.8415),     # closed form at 0 successes: z^2 / (n + z^2)
    (5, 5, 5 / (5 + 3.8415), 1.0),      # and at n successes: n / (n + z^2)
    (3, 5, 0.2307, 0.8824),
    (81, 263, 0.2553, 0.3662),          # Newcombe (1998), independent proportions, example (a)
])
def test_wilson_known_values(k, n, low, high):
    iv = stats.wilson(k, n)
    assert iv.estimate == pytest.approx(k / n)
    assert (iv.low, iv.high) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        stats.wilson(6, 5)
    with pytest.raises(ValueError):
        stats.wilson(0, 0)


def test_three_versus_four_passes_of_five_is_no_significant_change():
    base = [True, True, True, False, False]
    tuned = [True, True, True, True, False]
    change = stats.paired_proportion_difference(base, tuned)
    assert change.estimate == pytest.approx(0.2)
    assert change.low < 0 < change.high
    assert stats.verdict(change, higher_is_better=True) == "no significant change"


def test_paired_interval_calls_a_consistent_large_change():
    base = [False] * 40 + [True] * 10
    tuned = [True] * 30 + [False] * 10 + [True] * 10  # 30 problems fixed, none broken
    change = stats.paired_proportion_difference(base, tuned)
    assert change.estimate == pytest.approx(0.6) and change.low > 0.4
    assert stats.verdict(change, higher_is_better=True) == "better"
    assert stats.verdict(change, higher_is_better=False) == "**worse**"


def test_paired_interval_is_narrower_than_ignoring_the_pairing():
    # the same 2 discordant problems out of 100: pairing knows the other 98 agree
    base = [True] * 50 + [False] * 50
    tuned = [True] * 50 + [True, True] + [False] * 48
    paired = stats.paired_proportion_difference(base, tuned)
    unpaired_width = (stats.wilson(52, 100).high - stats.wilson(50, 100).low)
    assert paired.high - paired.low < 0.5 * unpaired_width


def test_paired_interval_covers_the_true_difference():
    """95% nominal: a simulated coverage far from it would mean a wrong formula."""
    rng = np.random.default_rng(1)
    n, trials, covered = 30, 600, 0
    p_base, p_flip_up, p_flip_down = 0.4, 0.15, 0.05
    true_diff = (1 - p_base) * p_flip_up - p_base * p_flip_down
    for _ in range(trials):
        base = rng.random(n) < p_base
        u = rng.random(n)
        tuned = np.where(base, u >= p_flip_down, u < p_flip_up)
        iv = stats.paired_proportion_difference(list(base), list(tuned))
        covered += iv.low <= true_diff <= iv.high
    assert 0.91 <= covered / trials <= 0.99


def test_bootstrap_mean_and_weights():
    iv = stats.bootstrap_mean([0.2, 0.4, 0.6, 0.8])
    assert iv.estimate == pytest.approx(0.5) and 0.2 <= iv.low < 0.5 < iv.high <= 0.8
    # a loss is token-weighted: a long sequence counts for more
    assert stats.bootstrap_mean([1.0, 3.0], weights=[3, 1]).estimate == pytest.approx(1.5)
    assert stats.bootstrap_mean([0.3, 0.9]) == stats.bootstrap_mean([0.3, 0.9])  # seeded: reproducible


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    base = rng.random(60)
    better = stats.paired_bootstrap_difference(base, base + 0.05 + rng.normal(0, 0.01, 60))
    assert better.low > 0 and stats.verdict(better, True) == "better"
    same = stats.paired_bootstrap_difference(base, base)
    assert (same.low, same.high) == (0.0, 0.0) and stats.verdict(same, True) == "no significant change"
    noisy = stats.paired_bootstrap_difference(base, rng.permutation(base))  # same values, new order
    assert noisy.low < 0 < noisy.high
    with pytest.raises(ValueError):
        stats.paired_bootstrap_difference([1.0], [1.0, 2.0])
