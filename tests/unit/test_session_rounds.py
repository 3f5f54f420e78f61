"""The finalize chance per round that speculation reads: measured from what sessions did after each round's
preview (finalized, previewed again, went idle), with an injected clock."""

from __future__ import annotations

import pytest

from diffusionx.policy.sessions import MAX_ROUND, MIN_ROUND_OUTCOMES, SessionTracker
from diffusionx.policy.speculation import SpeculationPolicy
from tests.fakes import FakeClock as Clock


def run_session(tracker: SessionTracker, name: str, rounds: int, finalize: bool = True) -> str:
    """`rounds` previews (each an edit of the last), then a finalize of the last; returns its id."""
    parent = None
    for round_ in range(1, rounds + 1):
        preview_id = f"{name}-{round_}"
        tracker.preview(preview_id, parent)
        parent = preview_id
    if finalize:
        tracker.finalize(parent, cloud_steps=5)
    return parent


def test_sessions_of_three_rounds_finalize_only_at_their_third():
    tracker = SessionTracker(clock=Clock(), wall_clock=Clock())
    for n in range(MIN_ROUND_OUTCOMES):
        run_session(tracker, f"s{n}", rounds=3)
    tracker.preview("new-1")
    assert tracker.finalize_chance("new-1") == 0.0  # five sessions all edited their first preview
    tracker.preview("new-2", "new-1")
    assert tracker.finalize_chance("new-2") == 0.0
    tracker.preview("new-3", "new-2")
    assert tracker.finalize_chance("new-3") == 1.0
    tracker.preview("new-4", "new-3")  # a fourth round: no session has left one yet
    assert tracker.finalize_chance("new-4") is None


def test_a_round_is_unknown_until_enough_sessions_left_it_and_idle_sessions_count_as_not_finalized():
    clock = Clock()
    tracker = SessionTracker(idle_s=30.0, clock=clock, wall_clock=clock)
    for n in range(MIN_ROUND_OUTCOMES - 1):
        run_session(tracker, f"done{n}", rounds=1)
    tracker.preview("open")
    assert tracker.finalize_chance("open") is None  # four outcomes of round 1
    run_session(tracker, "left", rounds=1, finalize=False)
    clock.now += 31.0  # "left" and "open" go idle at round 1
    tracker.preview("fresh")
    assert tracker.finalize_chance("fresh") == pytest.approx(4 / 6)
    assert tracker.finalize_chance("open") is None  # idle: no longer followed
    assert tracker.finalize_chance("unknown-id") is None


def test_rounds_beyond_the_last_bucket_share_one_chance():
    tracker = SessionTracker(clock=Clock(), wall_clock=Clock())
    for n in range(MIN_ROUND_OUTCOMES):
        run_session(tracker, f"long{n}", rounds=MAX_ROUND + 3)  # edits past MAX_ROUND, then finalizes
    last = run_session(tracker, "probe", rounds=MAX_ROUND + 1, finalize=False)
    # each long session left bucket MAX_ROUND three times by editing and once by finalizing; the probe
    # left it once by editing
    assert tracker.finalize_chance(last) == pytest.approx(MIN_ROUND_OUTCOMES / (4 * MIN_ROUND_OUTCOMES + 1))


def test_the_policy_speculates_at_or_above_its_floor_and_while_the_chance_is_unknown():
    policy = SpeculationPolicy(min_finalize_chance=0.2)
    assert policy.worth(None) and policy.worth(0.2) and policy.worth(1.0)
    assert not policy.worth(0.19) and not policy.worth(0.0)
    assert SpeculationPolicy(min_finalize_chance=0.0).worth(0.0)
    assert not SpeculationPolicy(mode="off").worth(1.0)
    with pytest.raises(ValueError, match=r"speculation_min_finalize_chance=1\.5 is not allowed: use 0\.\.1"):
        SpeculationPolicy(min_finalize_chance=1.5)
