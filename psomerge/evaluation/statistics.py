"""Uncertainty of scores: bootstrap confidence intervals over examples, and paired
comparisons of two models scored on the same examples.

A score is a weighted mean over suites of per-example values. Resampling is stratified:
each suite's examples are resampled with replacement on their own, so every resample keeps
the suites' sizes and weights. A paired comparison applies the same resample to both models,
so what the two share (easy and hard examples) cancels out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b`` on the same examples."""

    difference: Interval
    p_not_better: float  # share of resamples in which a does not beat b


def _resampled_means(scored: Mapping[str, Sequence[float]], weights: Mapping[str, float],
                     indices: Mapping[str, np.ndarray]) -> np.ndarray:
    total = sum(weights[s] for s in scored)
    out = 0.0
    for s, values in scored.items():
        v = np.asarray(values, dtype=np.float64)
        out = out + weights[s] * v[indices[s]].mean(axis=1) / total
    return out


def _indices(scored: Mapping[str, Sequence[float]], resamples: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.integers(0, len(v), size=(resamples, len(v))) for s, v in sorted(scored.items())}


def weighted_score(scored: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> float:
    total = sum(weights[s] for s in scored)
    return float(sum(weights[s] * np.mean(v) for s, v in scored.items()) / total)


def bootstrap(scored: Mapping[str, Sequence[float]], weights: Mapping[str, float], level: float = 0.95,
              resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the weighted mean score."""
    means = _resampled_means(scored, weights, _indices(scored, resamples, seed))
    tail = (1 - level) / 2
    return Interval(weighted_score(scored, weights), float(np.quantile(means, tail)),
                    float(np.quantile(means, 1 - tail)))


def paired_bootstrap(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                     weights: Mapping[str, float], level: float = 0.95, resamples: int = RESAMPLES,
                     seed: int = 0, margin: float = 0.0) -> Comparison:
    """Interval of score(a) - score(b) over resamples shared by both, and the share of
    resamples in which a does not beat b by more than ``margin``."""
    for s in a:
        if len(a[s]) != len(b[s]):
            raise ValueError(f"suite {s!r}: {len(a[s])} vs {len(b[s])} examples: not paired")
    idx = _indices(a, resamples, seed)
    diffs = _resampled_means(a, weights, idx) - _resampled_means(b, weights, idx)
    tail = (1 - level) / 2
    mean = weighted_score(a, weights) - weighted_score(b, weights)
    return Comparison(Interval(mean, float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail))),
                      float(np.mean(diffs <= margin)))


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); nan where either side is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"rank correlation needs two equally long series of 2 or more values ({len(a)}, {len(b)})")
    ra, rb = _ranks(a) - (len(a) + 1) / 2, _ranks(b) - (len(b) + 1) / 2
    denominator = float(np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")
