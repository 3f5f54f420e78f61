"""How far one benchmark run's comparison can be trusted: 95% intervals for the two comparisons the
speculation experiment reports (`clients.speculation_bench`).

- `paired_ratio`: the ratio of two means over paired samples (DiffusionX sessions against the same
  sessions edge only), with a percentile bootstrap over the pairs. Pairs are resampled together, so what
  both members of a pair share (the prompts, the load at that moment) cancels. scipy.stats.bootstrap does
  the same, but scipy is not otherwise a dependency and this is a few lines of numpy.
- `proportion_difference`: the difference of two proportions (SLO attainment with speculation minus
  without) with the normal (Wald) interval of independent binomials; fine at the hundreds of finalizes a
  run sends and attainments away from 0 and 1.

An interval that straddles a target says the run cannot tell whether it was met; more sessions or
finalizes narrow it (by the square root of their number).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

CONFIDENCE = 0.95  # the level of every interval here (`ci95`)
RESAMPLES = 4000


def paired_ratio(
    numerators: Sequence[float],
    denominators: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """`mean(numerators) / mean(denominators)` over paired samples, with its 95% bootstrap interval:
    `{"ratio", "ci95": [low, high], "pairs"}`."""
    if len(numerators) != len(denominators):
        raise ValueError(f"paired samples differ in length: {len(numerators)} and {len(denominators)}")
    if len(numerators) < 2:
        raise ValueError(f"need at least 2 pairs for an interval, not {len(numerators)}")
    top = np.asarray(numerators, dtype=float)
    bottom = np.asarray(denominators, dtype=float)
    if bottom.mean() <= 0.0:
        raise ValueError("the denominators' mean must be positive")
    picks = np.random.default_rng(seed).integers(0, len(top), size=(resamples, len(top)))
    ratios = top[picks].mean(axis=1) / bottom[picks].mean(axis=1)
    tail = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return {
        "ratio": round(float(top.mean() / bottom.mean()), 4),
        "ci95": [round(float(low), 4), round(float(high), 4)],
        "pairs": len(top),
    }


def proportion_difference(successes_a: int, total_a: int, successes_b: int, total_b: int) -> dict[str, Any]:
    """`successes_a / total_a - successes_b / total_b` with its 95% normal interval:
    `{"difference", "ci95": [low, high], "totals": [total_a, total_b]}`."""
    for successes, total in ((successes_a, total_a), (successes_b, total_b)):
        if total < 1 or not 0 <= successes <= total:
            raise ValueError(f"need 0 <= successes <= total and total >= 1, not {successes} of {total}")
    a, b = successes_a / total_a, successes_b / total_b
    spread = math.sqrt(a * (1 - a) / total_a + b * (1 - b) / total_b)
    z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2.0)
    difference = a - b
    return {
        "difference": round(difference, 4),
        "ci95": [round(difference - z * spread, 4), round(difference + z * spread, 4)],
        "totals": [total_a, total_b],
    }
