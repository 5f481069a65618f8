"""95% intervals for the eval report, so that "better" and "worse" mean more than noise.

- A proportion (greedy pass@1, FIM exact match): the Wilson score interval. Unlike the normal
  approximation it stays inside [0, 1] and keeps its coverage at small n and at 0 % or 100 %.
- A mean of per-item values (edit similarity, sampled pass@k, loss as token-weighted nats): a
  percentile bootstrap over items.
- A base-versus-tuned difference on the same items is paired. For pass/fail items it is Newcombe's
  hybrid score interval for paired proportions (Newcombe 1998, method 10: the two Wilson intervals,
  combined through the phi correlation of the 2x2 table), which is well calibrated down to a handful of
  items; for other values, a paired bootstrap (the same resampled items for both models).

A change is called only when its interval excludes zero; otherwise it is "no significant change".
Bootstraps use a fixed seed, so a report is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
BOOTSTRAP_RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def wilson(successes: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval for successes / n."""
    if n <= 0:
        raise ValueError("a proportion needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} is outside 0..{n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # (the interval always holds p; clamped so rounding cannot put p outside it, e.g. low = 6e-17 at 0/n)
    return Interval(p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def paired_proportion_difference(base: list[bool], tuned: list[bool], z: float = Z95) -> Interval:
    """tuned rate - base rate on the same items, with Newcombe's method-10 interval."""
    if len(base) != len(tuned) or not base:
        raise ValueError(f"paired outcomes need equal, non-zero lengths (got {len(base)} and {len(tuned)})")
    n = len(base)
    both = sum(1 for b, t in zip(base, tuned) if b and t)
    only_base = sum(1 for b, t in zip(base, tuned) if b and not t)
    only_tuned = sum(1 for b, t in zip(base, tuned) if t and not b)
    neither = n - both - only_base - only_tuned
    pt, pb = wilson(both + only_tuned, n, z), wilson(both + only_base, n, z)
    margins = (both + only_tuned) * (only_base + neither) * (both + only_base) * (only_tuned + neither)
    phi = (both * neither - only_base * only_tuned) / math.sqrt(margins) if margins else 0.0
    d = pt.estimate - pb.estimate
    lo = math.sqrt(max(0.0, (pt.estimate - pt.low) ** 2 - 2 * phi * (pt.estimate - pt.low) * (pb.high - pb.estimate)
                       + (pb.high - pb.estimate) ** 2))
    hi = math.sqrt(max(0.0, (pt.high - pt.estimate) ** 2 - 2 * phi * (pt.high - pt.estimate) * (pb.estimate - pb.low)
                       + (pb.estimate - pb.low) ** 2))
    return Interval(d, max(-1.0, d - lo), min(1.0, d + hi))


def _weighted_means(values: np.ndarray, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return (values[idx] * weights[idx]).sum(axis=1) / np.maximum(weights[idx].sum(axis=1), 1e-300)


def _resample(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _check(values, weights) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0 or w.shape != v.shape:
        raise ValueError("a bootstrap needs a non-empty 1-D list of values (and weights of the same length)")
    return v, w


def bootstrap_mean(values, weights=None, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = SEED) -> Interval:
    """Percentile interval of the (weighted) mean over items. For a loss, values are each item's mean
    nats per token and weights its token count, so the estimate is the token-weighted mean."""
    v, w = _check(values, weights)
    est = float((v * w).sum() / w.sum())
    boots = _weighted_means(v, w, _resample(len(v), resamples, seed))
    return Interval(est, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))


def paired_bootstrap_difference(base, tuned, weights=None, resamples: int = BOOTSTRAP_RESAMPLES,
                                seed: int = SEED) -> Interval:
    """tuned mean - base mean on the same items, both means taken over the same resampled items."""
    b, w = _check(base, weights)
    t, _ = _check(tuned, weights)
    if len(b) != len(t):
        raise ValueError(f"paired values need equal lengths (got {len(b)} and {len(t)})")
    d = t - b
    est = float((d * w).sum() / w.sum())
    boots = _weighted_means(d, w, _resample(len(d), resamples, seed))
    return Interval(est, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))


def verdict(change: Interval, higher_is_better: bool) -> str:
    """'better' or '**worse**' when the change's interval excludes zero, else 'no significant change'."""
    if not change.excludes_zero():
        return "no significant change"
    return "better" if (change.estimate > 0) == higher_is_better else "**worse**"
