"""Tenants: API keys with weights and rates; admission control shares each tier by weight and answers 429
to a key over its rate. Library only, with an injected clock."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from pydantic import ValidationError

from diffusionx.app_config import AppArgs
from diffusionx.policy.admission import AdmissionControl, ShareRefusal
from diffusionx.policy.load import TierLoad
from diffusionx.policy.tenants import ApiKey, RateLimits, Tenants, parse_key_line, weighted_allocation
from diffusionx.serving.guard import GuardConfig, load_api_keys, owner_of


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_keys_carry_a_weight_and_a_rate_in_the_config_or_the_keys_file(tmp_path):
    args = AppArgs(api_keys=["plain", {"key": "batch", "weight": 0.5, "rate_per_s": 2}])
    keys_file = tmp_path / "keys"
    keys_file.write_text("# key weight rate\nops weight=3 rate_per_s=0.5 burst=2  # the ops team\n\nold\n")
    keys = load_api_keys(args.api_keys, environ={"DIFFUSIONX_API_KEYS_FILE": str(keys_file)})
    assert [(k.key, k.weight, k.rate_per_s, k.burst) for k in keys] == [
        ("plain", 1.0, None, None),
        ("batch", 0.5, 2.0, None),
        ("ops", 3.0, 0.5, 2),
        ("old", 1.0, None, None),
    ]
    config = GuardConfig(keys)
    assert config.authenticate("Bearer ops") == owner_of("ops")
    with pytest.raises(ValueError, match="'rate=5' is not allowed; use weight=W, rate_per_s=R or burst=B"):
        parse_key_line("key rate=5")
    with pytest.raises(ValidationError, match="greater than 0"):
        AppArgs(api_keys=[{"key": "k", "weight": 0}])


def test_a_key_over_its_rate_is_refused_with_retry_after_and_a_refusal_spends_nothing():
    clock = FakeClock()
    limits = RateLimits({"a": (2.0, None), "b": (0.5, 1)}, clock)
    assert [limits.check("a") for _ in range(2)] == [None, None]  # burst: one second's worth (2)
    refusal = limits.check("a")
    assert refusal is not None and refusal.status == 429 and refusal.retry_after_s == 1
    assert "2 requests per second" in refusal.message
    clock.now += 0.5  # one emission interval (1 / 2 s): exactly one more fits
    assert limits.check("a") is None and limits.check("a") is not None
    assert limits.check("b") is None
    refusal = limits.check("b")
    assert refusal is not None and refusal.retry_after_s == 2  # 0.5/s: the next one in 2 s
    clock.now += 1.9
    assert limits.check("b") is not None  # refused again, and the refusals did not push it later
    clock.now += 0.1
    assert limits.check("b") is None
    assert limits.check("unlimited") is None


def test_weighted_allocation_is_max_min_fair():
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    # b wants little: it gets all of it, a and c split the rest 1:2
    allocation = weighted_allocation(100, {"a": 100, "b": 10, "c": 100}, weights)
    assert allocation == pytest.approx({"a": 30, "b": 10, "c": 60})
    # everyone fits: each gets its demand
    assert weighted_allocation(100, {"a": 10, "b": 20, "c": 30}, weights) == {"a": 10, "b": 20, "c": 30}
    assert weighted_allocation(0, {"a": 5}, {"a": 1.0}) == {"a": 0.0}


def shared_admission(clock: FakeClock, **weights: float) -> AdmissionControl:
    tenants = Tenants([(name, ApiKey(key=name, weight=w)) for name, w in weights.items()], clock=clock)
    admission = AdmissionControl({"cloud": 4}, max_wait_s=1.0, clock=clock, tenants=tenants)
    # 1 replica x batch 4, 0.1 s a batched step: 40 request-steps start within 1 s
    admission.update({"cloud": TierLoad(queued_steps=0, replicas=1, step_time_s=(0.1, 0.0))})
    return admission


def test_alone_a_key_may_use_the_whole_tier_and_the_bound_is_admission_controls():
    clock = FakeClock()
    admission = shared_admission(clock, a=1, b=1)
    with ExitStack() as held:
        admitted = 0
        while (refusal := admission.decide({"cloud": 10}, "a")) is None:
            held.enter_context(admission.admit({"cloud": 10}, "a"))
            admitted += 10
        # admission control's own bound: admitted while the queue's wait (0.025 s a step) is <= 1 s
        assert admitted == 50 and not isinstance(refusal, ShareRefusal) and refusal.retry_after_s == 1


def test_a_full_tier_refuses_the_key_over_its_share_and_admits_the_one_within_it():
    clock = FakeClock()
    admission = shared_admission(clock, a=1, b=1)
    with ExitStack() as held:
        for _ in range(4):  # a fills the tier while b is idle (a 40 of 40 request-steps)
            assert admission.decide({"cloud": 10}, "a") is None
            held.enter_context(admission.admit({"cloud": 10}, "a"))
        # b arrives: within its share (20 of 40), admitted although the tier is full of a's work
        assert admission.decide({"cloud": 10}, "b") is None
        held.enter_context(admission.admit({"cloud": 10}, "b"))
        # a is over its share (40 held, 20 allocated while b is active): refused, Retry-After until its
        # excess (40 + 10 - 20 = 30 request-steps at 0.1 / 4 s each) has drained
        refusal = admission.decide({"cloud": 10}, "a")
        assert isinstance(refusal, ShareRefusal) and refusal.status == 503
        assert refusal.used == 40 and refusal.allocated == pytest.approx(20)
        assert refusal.retry_after_s == 1 and "over its share" in refusal.message
        # b stays within its share: admitted again
        assert admission.decide({"cloud": 10}, "b") is None
    # b's reservation lasts while b was seen lately, then a has the whole tier again
    clock.now += 31.0
    with ExitStack() as held:
        for _ in range(4):
            assert admission.decide({"cloud": 10}, "a") is None
            held.enter_context(admission.admit({"cloud": 10}, "a"))
    assert admission.owner_steps == {"cloud": {}} and admission.owner_requests == {"cloud": {}}


def test_shares_follow_the_weights():
    clock = FakeClock()
    admission = shared_admission(clock, heavy=3, light=1)
    admission.decide({"cloud": 1}, "light")  # light is active: 1/4 of the tier stays reserved for it
    with ExitStack() as held:
        admitted = 0
        while admission.decide({"cloud": 5}, "heavy") is None:
            held.enter_context(admission.admit({"cloud": 5}, "heavy"))
            admitted += 5
        assert admitted == 30  # 3/4 of the 40 request-steps


def test_the_queue_bound_is_shared_by_weight_too():
    clock = FakeClock()
    tenants = Tenants([("a", ApiKey(key="a")), ("b", ApiKey(key="b"))], clock=clock)
    admission = AdmissionControl({"cloud": 4}, max_wait_s=100.0, clock=clock, tenants=tenants)
    admission.update({"cloud": TierLoad(replicas=1, step_time_s=(0.001, 0.0), request_capacity=6)})
    admission.decide({"cloud": 1}, "b")
    with ExitStack() as held:
        for _ in range(3):
            assert admission.decide({"cloud": 1}, "a") is None
            held.enter_context(admission.admit({"cloud": 1}, "a"))
        refusal = admission.decide({"cloud": 1}, "a")
        assert isinstance(refusal, ShareRefusal) and refusal.bound == "requests"


def test_rate_is_checked_first_and_answered_with_429():
    clock = FakeClock()
    tenants = Tenants([("a", ApiKey(key="a", rate_per_s=1.0))], clock=clock)
    admission = AdmissionControl({"cloud": 4}, clock=clock, tenants=tenants)
    assert admission.decide({"cloud": 1}, "a") is None
    refusal = admission.decide({"cloud": 1}, "a")
    assert refusal is not None and refusal.status == 429 and refusal.retry_after_s == 1
    assert admission.refused == 1


def test_reported_work_the_ingress_did_not_admit_stops_borrowing_not_a_key_within_its_share():
    clock = FakeClock()
    admission = shared_admission(clock, a=1, b=1)
    admission.decide({"cloud": 1}, "b")  # b active: a's share is 20 of the 40 request-steps
    # the tiers report 60 queued request-steps this ingress does not hold (lagging reports, or another
    # ingress replica's work): the tier as a whole is past its bound (1.5 s > 1 s)
    admission.update({"cloud": TierLoad(queued_steps=60, replicas=1, step_time_s=(0.1, 0.0))})
    with ExitStack() as held:
        assert admission.decide({"cloud": 10}, "a") is None  # within its share: admitted
        held.enter_context(admission.admit({"cloud": 10}, "a"))
        refusal = admission.decide({"cloud": 20}, "a")  # 30 > its share of 20: borrowing, no room
        assert isinstance(refusal, ShareRefusal) and refusal.retry_after_s == 1
        assert admission.decide({"cloud": 10}, "b") is None
