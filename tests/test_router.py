from __future__ import annotations

import pytest

from diffusionx.policy.router import CloudLoad, RouterConfig, decide_route, expected_latency_ms

CONFIG = RouterConfig(min_steps=10, strength_floor=0.2, overhead_ms=50.0)


def test_light_load_refines_fully():
    decision = decide_route(
        0.6, 50, CloudLoad(queued_steps=0, replicas=1, seconds_per_step=0.05), 5000, CONFIG
    )
    assert (decision.route, decision.strength, decision.num_inference_steps) == ("cloud", 0.6, 50)
    assert decision.cloud_steps == 30
    assert decision.expected_latency_ms == pytest.approx(30 * 50 + 50)


def test_no_target_or_unmeasured_step_time_refines_fully():
    busy = CloudLoad(queued_steps=10_000, replicas=1, seconds_per_step=0.05)
    assert decide_route(0.6, 50, busy, None, CONFIG).route == "cloud"
    unmeasured = CloudLoad(queued_steps=10_000, replicas=1, seconds_per_step=None)
    decision = decide_route(0.6, 50, unmeasured, 100, CONFIG)
    assert decision.route == "cloud" and "not measured" in decision.reason


def test_growing_load_cuts_steps_first():
    load = CloudLoad(queued_steps=20, replicas=1, seconds_per_step=0.05)  # 1 s of queue
    decision = decide_route(0.6, 50, load, 2000, CONFIG)
    assert decision.route == "cloud-reduced" and decision.strength == 0.6
    assert 10 <= decision.num_inference_steps < 50
    assert decision.expected_latency_ms <= 2000
    # the largest step count that fits: one more step would not
    more = expected_latency_ms(load, int((decision.num_inference_steps + 1) * 0.6), CONFIG)
    assert more > 2000 or decision.num_inference_steps == 49


def test_then_strength_within_the_floor():
    load = CloudLoad(queued_steps=20, replicas=1, seconds_per_step=0.05)  # 1000 ms queue + 50 ms overhead
    decision = decide_route(0.6, 50, load, 1250, CONFIG)  # room for 4 cloud steps: 10 steps at 0.4
    assert decision.route == "cloud-reduced" and decision.num_inference_steps == 10
    assert 0.2 <= decision.strength < 0.6 and decision.cloud_steps == 4
    assert "strength" in decision.reason


def test_then_falls_back_to_the_edge_and_says_why():
    load = CloudLoad(queued_steps=400, replicas=2, seconds_per_step=0.05)  # 10 s of queue per replica
    decision = decide_route(0.6, 50, load, 1000, CONFIG)
    assert decision.route == "edge-fallback" and decision.cloud_steps == 0
    assert "exceeds 1000 ms" in decision.reason and "2 replica" in decision.reason


def test_more_replicas_shorten_the_wait():
    one = CloudLoad(queued_steps=100, replicas=1, seconds_per_step=0.05)
    four = CloudLoad(queued_steps=100, replicas=4, seconds_per_step=0.05)
    assert expected_latency_ms(four, 10, CONFIG) < expected_latency_ms(one, 10, CONFIG)
    assert decide_route(0.5, 20, four, 2000, CONFIG).route == "cloud"
    assert decide_route(0.5, 20, one, 2000, CONFIG).route != "cloud"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"strength_predicted=1\.2"):
        decide_route(1.2, 50, CloudLoad(), None)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        decide_route(0.5, 0, CloudLoad(), None)
