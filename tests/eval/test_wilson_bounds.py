"""stats.wilson's interval always holds the observed rate: at 0/n its low end is exactly 0, not a
rounding error above it (6e-17 at 0/3 made eval's bar chart fail on a negative error bar)."""

from codetune.eval import stats


def test_wilson_interval_holds_the_rate_at_every_count():
    assert stats.wilson(0, 3).low == 0.0 and stats.wilson(3, 3).high == 1.0
    for n in range(1, 60):
        for k in range(n + 1):
            iv = stats.wilson(k, n)
            assert 0.0 <= iv.low <= iv.estimate <= iv.high <= 1.0, (k, n, iv)
