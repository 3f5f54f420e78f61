"""StepAwareRouter: the cloud tier's Ray Serve request router. A request goes to the replica where it is
expected to finish first. A request's size is the cost model's (`diffusionx.policy.cost`), in the unit
the replicas count their load in.

Every CloudRefiner replica publishes its load through Ray Serve's `record_routing_stats` (its step
batcher's pool with each sample's key and remaining steps, its queue, batch capacity and fitted batched
step time `t(b)`; see `diffusionx.engine.tiers.CloudModel.load_snapshot`). Serve's controller collects
those every `request_routing_stats_period_s` and hands them to every router as `RunningReplica.
routing_stats`. For each request this router replays each replica's step-batching schedule with the
request added (`diffusionx.policy.service_model.rank_replicas`, the same model the ingress's latency
prediction uses) and returns the replicas one per rank, earliest expected finish first; Serve sends the
request to the first that has room (`max_ongoing_requests`) and backs off as usual when none has.

Stats are up to one period old, and a burst routed within one period would all pick the same replica.
So the router keeps, per replica, the requests it sent there after that replica's snapshot was taken
(`taken_at`), and counts them as queued on top of it; once a newer snapshot covers them they are dropped.
A replica that has not reported yet is ranked after those that have (by the requests this router sent it).

Speculative refinements (`speculate`) are background work, never load: they are ranked like a refinement
(so they go where the tier is idlest) but not counted as sent. A call about a running speculation (its
first argument a `diffusionx.policy.speculation.Pinned`) goes to the replica that runs it, while that
replica is a candidate.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from diffusionx.policy.cost import StepDefaults, Work, request_cost
from diffusionx.policy.load import TierSnapshot
from diffusionx.policy.service_model import ReplicaLoad, rank_replicas
from diffusionx.policy.speculation import Pinned


def request_steps(pending_request: PendingRequest | None, defaults: StepDefaults) -> int:
    """The UNet calls a cloud request costs its replica (`diffusionx.policy.cost.request_cost`, the count
    the replica's model loop uses), read off the method called and its first argument. 1 for a call the
    cost model does not know (a health or stats call)."""
    if pending_request is None or not pending_request.args:
        return 1
    try:
        work = Work.of_method(pending_request.metadata.call_method)
        return request_cost(work, pending_request.args[0], defaults).unet_calls
    except (ValueError, TypeError):
        return 1


def _pinned_replica(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None or not pending_request.args:
        return None
    target = pending_request.args[0]
    return target.replica_id if isinstance(target, Pinned) else None


def _is_background(pending_request: PendingRequest) -> bool:
    """Speculation calls: background work and claims of it (a promotion is counted by the replica's
    next report)."""
    method = getattr(getattr(pending_request, "metadata", None), "call_method", "")
    return method == "speculate" or _pinned_replica(pending_request) is not None


class StepAwareRouter(FIFOMixin, RequestRouter):
    """Ranks replicas by when a request would finish there (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sent: dict[ReplicaID, list[tuple[float, int]]] = {}  # (sent_at, steps) not yet in stats
        self._step_defaults = StepDefaults(default_steps=1)  # until a replica publishes its model's

    def initialize_state(self, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"StepAwareRouter takes no request_router_kwargs, got {sorted(kwargs)}")

    def _defaults(self, replicas: list[RunningReplica]) -> StepDefaults:
        """The tier's default step count, as its replicas publish it (the model's; every replica serves
        the same model). Kept for `on_request_routed`, which is not handed the replicas."""
        for replica in replicas:
            default_steps = (replica.routing_stats or {}).get("default_steps")
            if default_steps:
                self._step_defaults = StepDefaults(int(default_steps))
                break
        return self._step_defaults

    def replica_load(self, replica: RunningReplica) -> ReplicaLoad:
        """The replica's last published load plus what this router sent it since."""
        stats = replica.routing_stats
        snapshot = TierSnapshot.from_dict(stats) if stats else None
        taken_at = snapshot.taken_at if snapshot is not None else 0.0
        sent = [entry for entry in self._sent.get(replica.replica_id, ()) if entry[0] > taken_at]
        self._sent[replica.replica_id] = sent
        load = ReplicaLoad.from_snapshot(snapshot) if snapshot is not None else ReplicaLoad()
        return load.with_queued([steps for _, steps in sent])

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        pinned = _pinned_replica(pending_request)
        for replica in candidate_replicas:
            if pinned is not None and replica.replica_id.unique_id == pinned:
                return [[replica]]
        loads = [self.replica_load(replica) for replica in candidate_replicas]
        order = rank_replicas(loads, request_steps(pending_request, self._defaults(candidate_replicas)))
        return [[candidate_replicas[i]] for i in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        if _is_background(pending_request):
            return
        steps = request_steps(pending_request, self._step_defaults)
        self._sent.setdefault(replica_id, []).append((time.time(), steps))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent.pop(replica_id, None)
