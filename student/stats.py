"""Paired bootstrap over held-out windows: is model A better than model B, and by how much?

    r = paired_bootstrap(nll_a, nll_b, n=2000, seed=0, stat=perplexity_of_means)
    r.estimate, r.low, r.high      # stat(A) - stat(B) on all windows, and its 95% percentile interval

`a` and `b` hold one value per held-out window (e.g. the mean next-token NLL of the window), for the same
windows in the same order. Each bootstrap replicate draws the windows with replacement, once for both
models (that is what makes it paired: the window-to-window variation common to both cancels), and
computes `stat(a[idx]) - stat(b[idx])`. Windows, not tokens, are the resampled unit because tokens inside a
window are strongly dependent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError


@dataclass(frozen=True)
class BootstrapResult:
    """A difference of a statistic between two models and its bootstrap interval."""

    estimate: float
    """stat(a) - stat(b) on all windows."""
    low: float
    """Lower end of the (1 - alpha) percentile interval."""
    high: float
    """Upper end of the interval."""
    replicates: int
    """Bootstrap replicates drawn."""
    windows: int
    """Paired values (held-out windows)."""
    confidence: float
    """1 - alpha (0.95 by default)."""

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean(values: np.ndarray) -> np.ndarray:
    """Mean along the last axis: [..., W] -> [...]."""
    return values.mean(axis=-1)


def perplexity_of_means(values: np.ndarray) -> np.ndarray:
    """exp(mean NLL) along the last axis: per-window mean NLLs of equal-length windows -> perplexity."""
    return np.exp(values.mean(axis=-1))


def paired_bootstrap(a, b, n: int = 2000, seed: int = 0, *, confidence: float = 0.95,
                     stat: Callable[[np.ndarray], np.ndarray] = mean, strata=None) -> BootstrapResult:
    """stat(a) - stat(b) and its percentile interval from `n` paired resamples of the windows.

    a, b: [W] float values per window (same windows, same order). `stat` maps [R, W] -> [R] (vectorised
    over the leading axis). strata: [W] labels (e.g. the domain of each window), or None; with them every
    resample draws each stratum's windows from that stratum only, so the strata keep their sizes. The same
    seed draws the same resamples whatever `stat` is. Deterministic for a given seed.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ConfigError(f"paired_bootstrap needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if a.shape[0] < 2:
        raise ConfigError(f"paired_bootstrap needs at least 2 windows, got {a.shape[0]}")
    if n < 1 or not 0.0 < confidence < 1.0:
        raise ConfigError(f"paired_bootstrap needs n >= 1 and 0 < confidence < 1, got {n}, {confidence}")
    w = a.shape[0]
    if strata is None:
        groups = [np.arange(w)]
    else:
        strata = np.asarray(strata)
        if strata.shape != a.shape:
            raise ConfigError(f"paired_bootstrap: strata {strata.shape} must match the windows {a.shape}")
        groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    rng = np.random.default_rng(seed)
    diffs = np.empty(n, dtype=np.float64)
    for start in range(0, n, 256):  # [chunk, W] index blocks bound the memory
        c = min(256, n - start)
        idx = np.concatenate([g[rng.integers(0, len(g), size=(c, len(g)))] for g in groups], axis=1)
        diffs[start: start + c] = stat(a[idx]) - stat(b[idx])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    estimate = float(stat(a[None])[0] - stat(b[None])[0])
    return BootstrapResult(estimate=estimate, low=float(low), high=float(high), replicates=n, windows=w,
                           confidence=confidence)
