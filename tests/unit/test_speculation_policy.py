"""The speculation policy, key and registry: pure functions and an injected clock."""

from __future__ import annotations

import pytest

from diffusionx.policy.speculation import (
    SpeculationPolicy,
    SpeculationRegistry,
    affordable_background,
    idle_share,
    preview_digest,
    speculation_key,
)


def test_background_fills_an_idle_step_and_shares_a_foreground_one_only_within_the_slowdown():
    flat = lambda b: 0.100 + 0.001 * b  # noqa: E731  (a GPU below its capacity: +1% a sample)
    steep = lambda b: 0.05 + 0.05 * b  # noqa: E731  (a CPU: each sample costs as much as the step)
    assert affordable_background(0, 8, steep) == 1  # idle: one sample, so an arrival waits one short step
    assert affordable_background(0, 8, flat) == 6  # t(6) = 0.106 <= 1.05 * t(1)
    assert affordable_background(0, 8, lambda b: None) == 1
    assert affordable_background(2, 8, flat, max_slowdown=0.05) == 5  # t(7) = 0.107 <= 1.05 * 0.102
    assert affordable_background(2, 8, flat, max_slowdown=0.02) == 2  # 0.104 -> 0.106 is <= 2% more
    assert affordable_background(2, 8, steep, max_slowdown=0.05) == 0
    assert affordable_background(8, 8, flat) == 0  # no empty slot
    assert affordable_background(1, 8, lambda b: None) == 0  # step time not measured: share nothing


def test_policy_submits_only_above_the_idle_floor_and_within_the_speculative_bound():
    policy = SpeculationPolicy(idle_floor=0.5, max_steps=20)
    idle = {"pool": [], "queued": 0, "max_batch_size": 4, "background_steps": 0}
    half = {"pool": [[3, 3], [5, 5]], "queued": 0, "max_batch_size": 4, "background_steps": 0}
    full = {"pool": [[3, 3], [5, 5], [6, 6]], "queued": 1, "max_batch_size": 4, "background_steps": 0}
    assert idle_share([idle, full]) == 0.5 and idle_share([full]) == 0.0
    assert policy.allows([idle], 10) and policy.allows([half], 10) and policy.allows([idle, full], 10)
    assert not policy.allows([full], 10) and not policy.allows([half, full], 10)
    assert not policy.allows([{**idle, "background_steps": 15}], 10)  # 15 + 10 > 20 queued
    assert not SpeculationPolicy(mode="off").allows([idle], 10)
    assert not policy.allows([], 10)  # no replica reported: no capacity known
    # a CPU replica whose host is busy right now (the edge just made the preview) holds it until a core is
    # free: submitted all the same
    busy_host = {**idle, "host_idle": False}
    assert policy.allows([busy_host]) and policy.allows([busy_host], 10)
    assert policy.allows([idle])  # before the strength is known: the tier is idle enough
    with pytest.raises(ValueError, match="speculation='maybe' is not allowed"):
        SpeculationPolicy(mode="maybe")  # type: ignore[arg-type]


def test_key_changes_with_every_input_that_changes_the_pixels_but_the_strength():
    digest = preview_digest(b"png bytes")
    base = ("a cat", 1, 20, None)
    key = speculation_key(digest, *base)
    assert key == speculation_key(preview_digest(b"png bytes"), *base)
    others = [
        speculation_key(preview_digest(b"other png"), *base),
        speculation_key(digest, "a dog", 1, 20, None),
        speculation_key(digest, "a cat", 2, 20, None),
        speculation_key(digest, "a cat", 1, 25, None),
        speculation_key(digest, "a cat", 1, 20, 7.5),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_registry_supersedes_per_session_expires_by_ttl_and_counts_results():
    registry = SpeculationRegistry(ttl_s=10.0)
    assert registry.register("k1", "replica-a", "s1", now=0.0, strength=0.3) == []
    assert registry.register("k2", "replica-b", "s2", now=1.0, strength=0.3) == []
    # a newer preview of session s1 supersedes k1: the caller drops it on replica-a
    [superseded] = registry.register("k3", "replica-b", "s1", now=2.0, strength=0.5)
    assert (superseded.key, superseded.replica_id) == ("k1", "replica-a")
    assert registry.locate("k1", now=3.0) is None  # gone: a miss
    entry = registry.locate("k3", now=3.0)
    assert entry is not None and (entry.replica_id, entry.strength) == ("replica-b", 0.5)
    assert registry.locate("k3", now=3.2) is not None  # still there while its claim is open ("running")
    registry.settle("k3", "hit")
    assert registry.locate("k3", now=3.5) is None  # one finalize claims it: settled, gone
    # the same speculation again on the same replica is not a supersession
    assert registry.register("k4", "replica-a", "s3", now=4.0, strength=0.3) == []
    assert registry.register("k4", "replica-a", "s3", now=4.5, strength=0.3) == []
    expired = registry.register("k5", "replica-a", "s4", now=12.0, strength=0.3)  # k2 (t=1) is past its TTL
    assert [e.key for e in expired] == ["k2"]
    assert registry.locate("k4", now=15.0) is None  # t=4.5 + 10 < 15: expired, and a miss
    assert registry.counts == {"hit": 1, "promoted": 0, "miss": 3, "superseded": 1, "expired": 2}
    assert set(registry.entries) == {"k5"} and registry.by_session == {"s4": "k5"}


def test_foreground_waiting_is_any_replica_with_queued_requests():
    from diffusionx.policy.speculation import foreground_waiting

    assert not foreground_waiting([])
    assert not foreground_waiting([{"queued": 0, "pool": [1, 2]}, {"max_batch_size": 4}])
    assert foreground_waiting([{"queued": 0}, {"queued": 2}])
