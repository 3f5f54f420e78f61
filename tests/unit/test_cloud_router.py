"""The cloud tier's request router with fake replicas: it ranks by expected finish, counts what it sent
since a replica's last stats, and is what the shipped configs and the deployment configure."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import ServeDeploySchema

from deployments.cloud_router import StepAwareRouter, request_steps
from diffusionx.policy.cost import StepDefaults
from diffusionx.policy.speculation import Pinned
from diffusionx.requests import Img2ImgRequest, PreviewRequest
from diffusionx.sampling.collaborative import CollaborationParams, CollaborativeRequest

ROOT = Path(__file__).resolve().parents[2]
STEP_S = [0.05, 0.01]  # t(b) = 50 ms + 10 ms per sample


@dataclass
class FakeReplica:
    """What the router reads of a `RunningReplica`: its id and the stats it published."""

    name: str
    routing_stats: dict[str, Any] = field(default_factory=dict)
    max_ongoing_requests: int = 16

    @property
    def replica_id(self) -> ReplicaID:
        return ReplicaID(unique_id=self.name, deployment_id=DeploymentID(name="CloudRefiner"))


@dataclass
class FakeMetadata:
    call_method: str


@dataclass
class FakePending:
    args: list[Any]
    method: str = "refine"

    @property
    def metadata(self) -> FakeMetadata:
        return FakeMetadata(self.method)


def stats(pool: list[tuple[int, int]], taken_at: float, batch: int = 4) -> dict[str, Any]:
    """A replica's `record_routing_stats` (a TierSnapshot dict) with `pool` in its step batcher."""
    steps = sum(remaining for _, remaining in pool)
    return {
        "queued": 0,
        "in_flight": len(pool),
        "queued_steps": steps,
        "pool": pool,
        "max_batch_size": batch,
        "step_time_s": STEP_S,
        "taken_at": taken_at,
    }


def refinement(steps: int = 20, strength: float = 0.5) -> FakePending:
    image = Image.new("RGB", (32, 32))
    return FakePending([Img2ImgRequest("a red circle", image, strength, seed=0, num_inference_steps=steps)])


def make_router() -> StepAwareRouter:
    router = StepAwareRouter(DeploymentID(name="CloudRefiner"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state()
    return router


def ranked(router: StepAwareRouter, replicas: list[FakeReplica], pending: FakePending) -> list[str]:
    ranks = asyncio.run(router.choose_replicas(replicas, pending))  # type: ignore[arg-type]
    assert all(len(rank) == 1 for rank in ranks)
    return [rank[0].name for rank in ranks]


def test_request_steps_reads_each_kind_of_cloud_request():
    defaults = StepDefaults(default_steps=30)
    assert request_steps(refinement(40, 0.5), defaults) == 20
    assert request_steps(refinement(40, 0.01), defaults) == 0  # int(0.4): the sampler runs no step
    text = PreviewRequest("a cat", 0, num_inference_steps=12)
    assert request_steps(FakePending([text], "generate"), defaults) == 12
    plan = CollaborativeRequest("a cat", 0, None, None, CollaborationParams.hybrid(20, switch_step=7))
    assert request_steps(FakePending([plan], "plan"), defaults) == 7
    ec_diff = CollaborativeRequest("a cat", 0, None, None, CollaborationParams())  # p=7, k=2, s=37 of 50
    assert request_steps(FakePending([ec_diff], "plan"), defaults) == 17  # its cloud UNet calls, not s
    assert request_steps(FakePending([PreviewRequest("a cat", 0)], "generate"), defaults) == 30
    assert request_steps(FakePending([refinement().args[0]], "refine_stream"), defaults) == 10
    assert request_steps(None, defaults) == 1


def test_uneven_load_sends_the_request_where_it_finishes_first():
    now = time.time()
    # busy: four aged 40-step samples fill every slot ahead of a new request; light: one short sample
    busy = FakeReplica("busy", stats([(5, 40)] * 4, now))
    light = FakeReplica("light", stats([(3, 3)], now))
    router = make_router()
    assert ranked(router, [busy, light], refinement()) == ["light", "busy"]
    assert ranked(router, [light, busy], refinement()) == ["light", "busy"]  # not the list order


def test_fewest_requests_is_not_the_criterion():
    now = time.time()
    # two long samples hold two of four slots for 60 steps, the new one joins the free slots at once;
    # six 4-step samples keep all four slots busy for 8 steps first
    few_long = FakeReplica("few-long", stats([(60, 60)] * 2, now))
    many_short = FakeReplica("many-short", stats([(4, 4)] * 6, now))
    assert ranked(make_router(), [many_short, few_long], refinement(20, 0.5)) == ["few-long", "many-short"]


def test_a_burst_within_one_stats_period_is_spread_by_what_the_router_sent():
    now = time.time()
    a = FakeReplica("a", stats([], now - 1.0, batch=1))
    b = FakeReplica("b", stats([], now - 1.0, batch=1))
    router = make_router()
    chosen = []
    for _ in range(6):  # no new stats arrive during the burst
        first = ranked(router, [a, b], refinement(20, 1.0))[0]
        chosen.append(first)
        router.on_request_routed(None, {"a": a, "b": b}[first].replica_id, None)  # type: ignore[arg-type]
    assert chosen.count("a") == 3 and chosen.count("b") == 3
    # a newer snapshot of `a` covers what was sent to it: those are no longer added on top
    a.routing_stats = stats([], time.time() + 1e-3, batch=1)
    assert router.replica_load(a).requests == 0 and router.replica_load(b).requests == 3  # type: ignore[arg-type]


def test_speculation_calls_go_to_their_replica_and_speculations_are_not_counted_as_load():
    now = time.time()
    busy = FakeReplica("busy", stats([(30, 30)] * 4, now))
    idle = FakeReplica("idle", stats([], now))
    router = make_router()
    # a claim of the speculation running on "busy" goes there, though "idle" would finish first
    assert ranked(router, [idle, busy], FakePending([Pinned("key", "busy")])) == ["busy"]
    # its replica gone: ranked as usual (the replica it lands on answers that it holds no such speculation)
    assert ranked(router, [idle], FakePending([Pinned("key", "busy")])) == ["idle"]
    # a speculation is ranked like a refinement (to the idlest replica) but is not counted as sent
    speculate = FakePending(refinement().args, method="speculate")
    assert ranked(router, [busy, idle], speculate)[0] == "idle"
    router.on_request_routed(speculate, idle.replica_id, None)  # type: ignore[arg-type]
    router.on_request_routed(FakePending([Pinned("key", "idle")]), idle.replica_id, None)  # type: ignore[arg-type]
    assert router.replica_load(idle).requests == 0  # type: ignore[arg-type]
    router.on_request_routed(refinement(), idle.replica_id, None)  # type: ignore[arg-type]
    assert router.replica_load(idle).requests == 1  # type: ignore[arg-type]


def test_a_replica_that_has_not_reported_comes_last():
    now = time.time()
    reported = FakeReplica("reported", stats([(5, 40)] * 8, now))
    silent = FakeReplica("silent")
    assert ranked(make_router(), [silent, reported], refinement()) == ["reported", "silent"]
    assert asyncio.run(make_router().choose_replicas([], refinement())) == []  # type: ignore[arg-type]


def test_router_kwargs_are_refused_by_name():
    with pytest.raises(ValueError, match=r"no request_router_kwargs.*'alpha'"):
        StepAwareRouter(DeploymentID(name="CloudRefiner"), DeploymentHandleSource.UNKNOWN).initialize_state(
            alpha=1
        )


@pytest.mark.parametrize("path", sorted(ROOT.glob("serve_config*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_uses_the_step_aware_router(path):
    from deployments.cloud import CloudRefiner

    [app] = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text())).applications
    [cloud] = [d for d in app.deployments if d.name == "CloudRefiner"]
    config = RequestRouterConfig(**cloud.request_router_config)  # the schema keeps it as a dict
    assert config.request_router_class == "deployments.cloud_router.StepAwareRouter"
    assert config.get_serialized_request_router_cls()  # the class imports
    assert hasattr(CloudRefiner.func_or_class, "record_routing_stats")
