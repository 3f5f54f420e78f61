"""The recent busy share a replica reports, and the speculation policy reading it: a tier under load is
not idle in the moments between its requests. Injected clock, no model."""

from __future__ import annotations

import math

import pytest

from diffusionx.engine.monitor import TierMonitor
from diffusionx.policy.busy import BusyShare
from diffusionx.policy.speculation import SpeculationPolicy, idle_share


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_busy_share_decays_toward_the_state_that_holds():
    share = BusyShare(tau_s=10.0)
    share.update(True, 0.0)
    assert share.at(0.0) == 0.0
    assert share.at(10.0) == pytest.approx(1 - math.exp(-1))  # one time constant busy
    share.update(False, 10.0)
    assert share.at(20.0) == pytest.approx((1 - math.exp(-1)) * math.exp(-1))
    assert share.at(5.0) == share.share  # a clock behind the last update changes nothing


def run_load(utilization: float, service_s: float = 1.0, seconds: float = 120.0) -> tuple[dict, float]:
    """A replica serving one request at a time, arrivals every `service_s / utilization` (above 1: a
    backlog). Returns the last snapshot, taken in a gap between two requests where there is one, and the
    least idle share the policy read at the arrivals."""
    clock = Clock()
    monitor = TierMonitor(clock=clock)
    monitor.max_batch_size = 1
    period = service_s / utilization
    arrivals = [i * period for i in range(int(seconds / period))]
    free_at = 0.0
    events: list[tuple[float, str]] = []
    for arrival in arrivals:
        start = max(arrival, free_at)
        free_at = start + service_s
        events += [(arrival, "enqueue"), (start, "admit"), (free_at, "complete")]
    for when, what in sorted(events, key=lambda event: (event[0], event[1] != "complete")):
        clock.now = when
        if what == "enqueue":
            monitor.enqueue(10)
        elif what == "admit":
            monitor.admit(1)
        else:
            monitor.completed(1)
    clock.now = free_at  # the moment the last request left: the pool is empty
    return monitor.snapshot().to_dict(), monitor.busy.at(clock.now)


def test_at_twice_capacity_the_policy_sees_a_busy_tier_even_with_an_empty_pool():
    policy = SpeculationPolicy(idle_floor=0.5)
    busy, share = run_load(utilization=2.0)
    assert busy["pool"] == [] and busy["queued"] == 0 and busy["in_flight"] == 0
    assert share > 0.95 and busy["busy_share"] == pytest.approx(share)
    assert idle_share([busy]) < 0.05 and not policy.allows([busy], 10)
    quiet, share = run_load(utilization=0.3)
    assert 0.15 < share < 0.45  # about the load
    assert policy.allows([quiet], 10)


def test_a_snapshot_without_a_busy_share_reads_as_recently_idle():
    idle = {"pool": [], "queued": 0, "max_batch_size": 4, "background_steps": 0}
    assert idle_share([idle]) == 1.0
    assert idle_share([idle, {**idle, "busy_share": 0.8}]) == pytest.approx(0.6)
