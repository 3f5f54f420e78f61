"""The benchmarks' 95% intervals: a paired ratio of means (bootstrap) and a difference of proportions."""

from __future__ import annotations

import random

import pytest

from clients.uncertainty import paired_ratio, proportion_difference


def test_paired_ratio_is_the_ratio_of_means_and_its_interval_covers_the_truth():
    rng = random.Random(3)
    # sessions whose latency varies a lot from one to the next; the paired one is 0.9x of it, plus noise
    base = [rng.uniform(0.2, 0.8) for _ in range(200)]
    edge = [b + rng.gauss(0.0, 0.02) for b in base]
    dx = [0.9 * b + rng.gauss(0.0, 0.02) for b in base]
    result = paired_ratio(dx, edge)
    assert result["ratio"] == pytest.approx(sum(dx) / sum(edge), abs=1e-4) and result["pairs"] == 200
    low, high = result["ci95"]
    assert low < 0.9 < high and high - low < 0.03  # pairing cancels the sessions' own spread
    # the same samples unpaired (shuffled): the interval is much wider
    shuffled = paired_ratio(dx, rng.sample(edge, len(edge)))
    assert shuffled["ci95"][1] - shuffled["ci95"][0] > 3 * (high - low)
    # fewer pairs, wider interval; the same seed, the same interval
    few = paired_ratio(dx[:20], edge[:20])
    assert few["ci95"][1] - few["ci95"][0] > high - low
    assert paired_ratio(dx[:20], edge[:20]) == few


def test_paired_ratio_refuses_what_it_cannot_pair():
    with pytest.raises(ValueError, match="differ in length"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_ratio([1.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        paired_ratio([1.0, 2.0], [0.0, 0.0])


def test_proportion_difference_and_its_interval():
    result = proportion_difference(380, 400, 372, 400)  # 0.95 against 0.93
    assert result["difference"] == pytest.approx(0.02) and result["totals"] == [400, 400]
    low, high = result["ci95"]
    # sqrt(.95*.05/400 + .93*.07/400) = 0.016778; 1.96 of it either side
    assert low == pytest.approx(0.02 - 1.96 * 0.016778, abs=2e-4)
    assert high == pytest.approx(0.02 + 1.96 * 0.016778, abs=2e-4)
    assert proportion_difference(10, 10, 10, 10)["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="successes <= total"):
        proportion_difference(5, 4, 1, 4)
    with pytest.raises(ValueError, match="total >= 1"):
        proportion_difference(0, 0, 1, 4)
