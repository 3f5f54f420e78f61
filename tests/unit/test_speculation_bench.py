"""The speculation experiment (`clients.speculation_bench`): its low-load schedule and the intervals of
its comparisons."""

import random

import pytest

from clients.speculation_bench import alternating_arrivals, session_ratio, slo_difference


def test_diffusionx_sessions_and_their_edge_only_runs_alternate_in_one_schedule():
    diffusionx, edge = alternating_arrivals(2.0, 24, random.Random(3))
    assert len(diffusionx) == len(edge) == 24
    merged = [t for pair in zip(diffusionx, edge, strict=True) for t in pair]
    assert merged == sorted(merged)  # each session's edge-only run arrives between it and the next one
    # both halves of one Poisson process at the rate: each arm at about half of it
    assert 24 / merged[-1] == pytest.approx(1.0, rel=0.5)


def test_a_rate_too_low_for_the_sessions_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="raise the rate"):
        alternating_arrivals(0.001, 24, random.Random(3))


def _session(key: str, latencies_ms: list[float], status: int = 200) -> list[dict]:
    kinds = ["preview"] + ["edit"] * (len(latencies_ms) - 2) + ["finalize"]
    return [
        {
            "session": key,
            "kind": kind,
            "status": status,
            "e2e_ms": ms,
            "quality": "",
            "cloud_unet_calls": 0,
            "edge_unet_calls": 0,
        }
        for kind, ms in zip(kinds, latencies_ms, strict=True)
    ]


def test_sessions_are_paired_with_their_own_edge_only_runs():
    ours = _session("a", [100, 80, 10]) + _session("b", [300, 280, 10]) + _session("c", [120, 90, 10])
    ours += _session("failed", [100, 80, 10], status=503)  # incomplete: not paired
    theirs = (
        _session("a", [100, 100, 100]) + _session("b", [300, 300, 300]) + _session("only-edge", [1, 1, 1])
    )
    ratio = session_ratio(ours, theirs)
    assert ratio is not None and ratio["pairs"] == 2
    assert ratio["ratio"] == pytest.approx((190 + 590) / (300 + 900), abs=1e-4)
    low, high = ratio["ci95"]
    assert low <= ratio["ratio"] <= high
    assert session_ratio(ours, _session("a", [1, 1, 1])) is None  # one pair: no interval


def test_slo_difference_counts_every_finalize_of_each_run():
    def finalizes(within: int, late: int, failed: int) -> list[dict]:
        rows = [{"kind": "finalize", "status": 200, "e2e_ms": 500} for _ in range(within)]
        rows += [{"kind": "finalize", "status": 200, "e2e_ms": 5000} for _ in range(late)]
        rows += [{"kind": "finalize", "status": 503, "e2e_ms": 5} for _ in range(failed)]
        for index, row in enumerate(rows):
            row.update(session="", quality="", cloud_unet_calls=0, edge_unet_calls=0, index=index)
        return rows

    difference = slo_difference([finalizes(380, 15, 5), finalizes(372, 28, 0)], 1000.0)
    assert difference is not None and difference["totals"] == [400, 400]
    assert difference["difference"] == pytest.approx(0.95 - 0.93)
    assert difference["ci95"][0] < 0 < difference["ci95"][1]  # 400 finalizes each cannot resolve 0.02
    assert slo_difference([finalizes(1, 0, 0), []], 1000.0) is None
