"""pass@k with the unbiased estimator of the Codex paper (Chen et al. 2021, eq. 1): from n samples per
problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k), computed as a product for numeric stability.
Sampling exactly k and counting successes would be a high-variance estimate; this is not."""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn (without replacement) from n passes."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}; raise --n-samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ks_for(n: int) -> list[int]:
    """The usual k values (1, 10, 100) that n samples per problem can estimate."""
    return [k for k in (1, 10, 100) if k <= n]


def mean_pass_at_k(counts: list[tuple[int, int]], ks: list[int]) -> dict[str, float]:
    """counts: (n, c) per problem -> {"pass@k": mean over problems}."""
    if not counts:
        return {f"pass@{k}": 0.0 for k in ks}
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks}
