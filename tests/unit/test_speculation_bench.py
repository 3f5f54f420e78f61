"""The speculation experiment's low-load schedule (`clients.speculation_bench`)."""

import random

import pytest

from clients.speculation_bench import alternating_arrivals


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
