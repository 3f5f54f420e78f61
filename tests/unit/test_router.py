from __future__ import annotations

import pytest

from diffusionx.policy.router import CloudLoad, RouterConfig, decide_route, expected_latency_ms
from diffusionx.policy.service_model import ReplicaLoad

CONFIG = RouterConfig(min_steps=10, strength_floor=0.2, overhead_ms=50.0)
STEP_S = (0.05, 0.0)  # t(b) = 50 ms whatever the batch size
HALF_STEP_MS = 25.0  # a request arrives half-way through the running step


def replica(*pool: tuple[int, int], batch: int = 1, step_s=STEP_S) -> ReplicaLoad:
    """A replica whose step batcher holds `pool` = (key, remaining steps) samples."""
    return ReplicaLoad(pool=tuple(pool), max_batch_size=batch, step_time_s=step_s)


def test_light_load_refines_fully():
    decision = decide_route(0.6, 50, CloudLoad((replica(),)), 5000, CONFIG)
    assert (decision.route, decision.strength, decision.num_inference_steps) == ("cloud", 0.6, 50)
    assert decision.cloud_steps == 30
    assert decision.expected_latency_ms == pytest.approx(30 * 50 + 50)


def test_no_target_or_unmeasured_step_time_refines_fully():
    busy = CloudLoad((replica(*[(200, 200)] * 50),))
    assert decide_route(0.6, 50, busy, None, CONFIG).route == "cloud"
    unmeasured = CloudLoad((ReplicaLoad(pool=((200, 200),)),))
    decision = decide_route(0.6, 50, unmeasured, 100, CONFIG)
    assert decision.route == "cloud" and "not measured" in decision.reason
    assert decision.expected_latency_ms is None
    assert decide_route(0.6, 50, CloudLoad(), 100, CONFIG).reason.endswith("not measured yet")


def test_growing_load_cuts_steps_first():
    load = CloudLoad((replica((20, 20)),))  # one 20-step sample ahead, one slot: 1 s of work
    decision = decide_route(0.6, 50, load, 2000, CONFIG)
    assert decision.route == "cloud-reduced" and decision.strength == 0.6
    assert 10 <= decision.num_inference_steps < 50
    assert decision.expected_latency_ms <= 2000
    # the largest step count that fits: one more step would not
    more = expected_latency_ms(load, int((decision.num_inference_steps + 1) * 0.6), CONFIG)
    assert more > 2000 or decision.num_inference_steps == 49
    # fewest remaining steps first: with 19 cloud steps it goes ahead of the 20-step sample
    assert decision.num_inference_steps == 33 and decision.cloud_steps == 19
    assert decision.expected_latency_ms == pytest.approx(HALF_STEP_MS + 19 * 50 + 50)


def test_then_strength_within_the_floor():
    # an aged sample (key 5, 20 steps left) stays ahead of any newcomer: 1025 ms + 50 ms overhead
    load = CloudLoad((replica((5, 20)),))
    decision = decide_route(0.6, 50, load, 1275, CONFIG)  # room for 4 cloud steps: 10 steps at 0.4
    assert decision.route == "cloud-reduced" and decision.num_inference_steps == 10
    assert 0.2 <= decision.strength < 0.6 and decision.cloud_steps == 4
    assert "strength" in decision.reason


def test_then_falls_back_to_the_edge_and_says_why():
    aged = replica(*[(1, 100)] * 2)  # 10 s of work that no newcomer passes, on each replica
    decision = decide_route(0.6, 50, CloudLoad((aged, aged)), 1000, CONFIG)
    assert decision.route == "edge-fallback" and decision.cloud_steps == 0
    assert "exceeds 1000 ms" in decision.reason and "of 2" in decision.reason


def test_work_ahead_counts_in_batched_steps_not_summed_steps():
    # 8 samples of 10 steps fill a batch of 8: about 10 batched steps ahead, not 80 steps
    step_s = (0.01, 0.005)  # t(1) = 15 ms, t(8) = 50 ms
    load = CloudLoad((replica(*[(10, 10)] * 8, batch=8, step_s=step_s),))
    expected = expected_latency_ms(load, 10, CONFIG)
    assert expected == pytest.approx(HALF_STEP_MS + 10 * 50 + 10 * 15 + 50)
    assert decide_route(1.0, 10, load, 1000, CONFIG).route == "cloud"


def test_the_request_is_expected_on_the_less_loaded_replica():
    crowded = replica(*[(1, 40)] * 4)
    light = replica((1, 40))
    one = CloudLoad((crowded,))
    two = CloudLoad((crowded, light))
    assert expected_latency_ms(two, 10, CONFIG) < expected_latency_ms(one, 10, CONFIG)
    assert decide_route(0.5, 20, two, 2700, CONFIG).route == "cloud"
    assert decide_route(0.5, 20, one, 2700, CONFIG).route != "cloud"


def test_load_shows_what_the_decision_used():
    load = CloudLoad((replica(*[(1, 40)] * 4), ReplicaLoad(((3, 8),), (15, 15), 4, (0.02, 0.005))))
    used = load.to_dict()
    assert used["replicas"] == 2 and used["replica"] == 1
    assert (used["samples"], used["queued"], used["remaining_steps"]) == (1, 2, 38)
    assert used["tier_remaining_steps"] == 160 + 38 and used["max_batch_size"] == 4
    assert (used["step_t0_ms"], used["step_t1_ms"]) == (20.0, 5.0)
    assert CloudLoad().to_dict() == {"replicas": 0.0}


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"strength_predicted=1\.2"):
        decide_route(1.2, 50, CloudLoad(), None)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        decide_route(0.5, 0, CloudLoad(), None)
