"""Racing: score a particle on a first slice of the search split and stop as soon as it
cannot beat what it must beat (its personal best), instead of scoring every example.

Examples are scored in a fixed order (the split's seeded permutation), so a particle and its
personal best are compared example by example. Two stopping rules, both conservative:

- sure: even if every unseen example scored 1, the full fitness could not exceed the target.
  This never stops a particle that the full split would have made a new best.
- statistical (``confidence``, e.g. 0.95): the paired difference to the target on the seen
  examples, extrapolated to the unseen ones with a finite-population correction and a
  variance floor, has an upper confidence bound below zero.

A stopped particle's fitness is the unbiased estimate of its full-split fitness (target plus
the estimated difference), flagged as raced: comparable with full fitnesses in expectation,
never stored as a full fitness, and below its personal best (so it cannot become a personal
or global best). Every count reports examples scored, raced or not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import Field

from psomerge.yamlconfig import StrictModel

_VARIANCE_PRIOR = (0.25, 2.0)  # pseudo-observations of a paired difference's variance: (value, count)


class RacingSettings(StrictModel):
    confidence: float | None = Field(0.95, gt=0.5, lt=1)  # None: the sure rule only
    chunk: int = Field(16, gt=0)  # examples per suite scored between two checks
    min_examples: int = Field(16, gt=0)  # per suite, before the statistical rule may stop a particle


def normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9)."""
    a = [-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00]
    b = [-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01]
    c = [-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00]
    d = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00]
    if p < 0.02425:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    if p > 1 - 0.02425:
        return -normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


def sure_upper_bound(seen: Mapping[str, Sequence[float]], sizes: Mapping[str, int],
                     weights: Mapping[str, float]) -> float:
    """The highest full fitness still possible: every unseen example scoring 1."""
    total = sum(weights.values())
    return sum(weights[s] * (sum(seen[s]) + sizes[s] - len(seen[s])) / sizes[s] for s in sizes) / total


def estimate(seen: Mapping[str, Sequence[float]], sizes: Mapping[str, int], weights: Mapping[str, float],
             target_values: Mapping[str, Sequence[float]], target: float) -> tuple[float, float]:
    """(estimated full fitness, standard error) from the seen examples' differences to the
    target's values on the same examples."""
    total = sum(weights.values())
    diff, var = 0.0, 0.0
    for s, n_all in sizes.items():
        d = [v - t for v, t in zip(seen[s], target_values[s])]
        n = len(d)
        if n == 0:
            return target, math.inf
        mean = sum(d) / n
        ss = sum((x - mean) ** 2 for x in d)
        prior, count = _VARIANCE_PRIOR
        s2 = (ss + prior * count) / (n - 1 + count)
        unseen = n_all - n
        w = weights[s] / total
        diff += w * (sum(d) + unseen * mean) / n_all
        fpc = unseen / max(n_all - 1, 1)
        var += (w * unseen / n_all) ** 2 * s2 / n * fpc
    return target + diff, math.sqrt(var)


def should_stop(seen: Mapping[str, Sequence[float]], sizes: Mapping[str, int], weights: Mapping[str, float],
                target: float, target_values: Mapping[str, Sequence[float]] | None,
                settings: RacingSettings) -> bool:
    """True when the particle cannot beat ``target`` (see the module's two rules)."""
    if all(len(seen[s]) >= sizes[s] for s in sizes):
        return False  # complete: nothing left to save
    if sure_upper_bound(seen, sizes, weights) <= target:
        return True
    if settings.confidence is None or target_values is None:
        return False
    if any(len(seen[s]) < min(settings.min_examples, sizes[s]) for s in sizes):
        return False
    value, se = estimate(seen, sizes, weights, target_values, target)
    return value + normal_quantile(settings.confidence) * se < target
