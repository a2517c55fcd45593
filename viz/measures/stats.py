"""Uncertainty for data-set numbers: percentile bootstrap of a mean, and of a paired difference.

Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), ch. 13: resample the images with
replacement, take the mean each time, read the 2.5% and 97.5% quantiles. The paired version
resamples image indices once for both models, so the interval is the one of the per-image
differences (what a paper comparing two networks on the same images should print).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Estimate", "bootstrap_mean", "paired_difference", "BOOTSTRAP_SAMPLES"]

BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap confidence interval over `n` finite values (nan when n = 0)."""

    mean: float
    low: float
    high: float
    n: int


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    return v[np.isfinite(v)]


def _interval(v: np.ndarray, samples: int, level: float, seed: int) -> Estimate:
    if v.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be within (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    # resample in slices so memory stays bounded for large data sets
    means = np.empty(samples)
    per = max(1, 2**22 // v.size)
    for start in range(0, samples, per):
        stop = min(samples, start + per)
        means[start:stop] = v[rng.integers(0, v.size, size=(stop - start, v.size))].mean(1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Estimate(float(v.mean()), float(low), float(high), int(v.size))


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean of the finite `values` and its percentile-bootstrap interval (nan values dropped)."""
    return _interval(_finite(values), samples, level, seed)


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean of a - b over the images where both are finite, with its paired bootstrap interval.

    Raises:
        ValueError: `a` and `b` differ in length (they must be the same images, in order).
    """
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same images: {x.size} vs {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return _interval(x[keep] - y[keep], samples, level, seed)
