"""The load vocabulary: one replica's report (`TierSnapshot`) and a tier's load over its replicas
(`TierLoad`, merged by `merge_snapshots`). Each field has one meaning; the replicas' `engine.monitor`
fills the snapshots, the service model, the router and admission control read them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TierSnapshot:
    """One replica's load report: what SharedState merges into the tier view, what the request router
    and the service model read (`service_model.ReplicaLoad.from_snapshot`). It travels as a dict
    (`to_dict`, `from_dict`): Serve's routing stats and the stats API are dicts."""

    queued: int = 0  # requests waiting for the model
    in_flight: int = 0  # requests the model is on
    queued_steps: int = 0  # UNet calls of queued plus in-flight requests not run yet (`policy.cost`)
    recent_batch_sizes: list[int] = field(default_factory=list)
    seconds_per_step: float | None = None  # t(b) at the mean recent batch size (from `step_time_s`)
    requests_served: int = 0
    taken_at: float = 0.0  # time.time() when taken
    pool: list[tuple[int, int]] = field(default_factory=list)  # step batcher: (key, remaining steps)
    max_batch_size: int = 1
    step_time_s: list[float] | None = None  # (t0, t1) of t(b) = t0 + t1 * b; None: not measured yet
    # the replica's request bounds as its deployment sets them (Serve's max_ongoing_requests and
    # max_queued_requests, the latter per caller, -1: unbounded); None outside a served replica
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    default_steps: int | None = None  # the tier model's step count for requests that set none
    # speculative (background) work: not load, so in none of the fields above
    background_requests: int = 0
    background_steps: int = 0
    # UNet calls speculation ran in the background: "used" (answered a refine) and "wasted" (dropped)
    speculative_unet_calls: dict[str, int] = field(default_factory=lambda: {"used": 0, "wasted": 0})
    # recent share of time with foreground work queued or running (`diffusionx.policy.busy`)
    busy_share: float = 0.0
    # whether the replica's background gate lets speculative steps run now (a CPU replica: the host has a
    # core free of other processes, `engine.host_share`); always True without a gate
    host_idle: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, report: Mapping[str, Any]) -> TierSnapshot:
        """From `to_dict`'s dict; keys it does not know (a newer replica's) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in report.items() if key in known})


@dataclass(frozen=True)
class TierLoad:
    """A tier's load over its live replicas: what admission control reads and `/v1/stats` shows."""

    queued: int = 0
    in_flight: int = 0
    queued_steps: int = 0  # UNet calls of queued plus in-flight requests not run yet, all replicas
    replicas: int = 0
    recent_batch_sizes: tuple[int, ...] = ()
    seconds_per_step: float | None = None  # mean of the replicas'
    step_time_s: tuple[float, float] | None = None  # mean (t0, t1) of the replicas' fitted t(b)
    requests_served: int = 0
    # requests one caller can have at the tier before Serve refuses more (`request_capacity`)
    request_capacity: int | None = None
    per_replica: tuple[TierSnapshot, ...] = ()

    @property
    def replica_slots(self) -> int | None:
        """Requests the tier's replicas run at once (their max_ongoing_requests summed); None when a
        replica does not say."""
        slots = [s.max_ongoing_requests for s in self.per_replica]
        if not slots or any(n is None for n in slots):
            return None
        return sum(n for n in slots if n is not None)

    def step_s(self, batch_size: int) -> float | None:
        """Seconds of one batched step of `batch_size` on the fitted t(b); None before any measurement."""
        if self.step_time_s is None:
            return None
        t0, t1 = self.step_time_s
        return t0 + t1 * batch_size

    def to_dict(self) -> dict[str, Any]:
        """The `/v1/stats` form (`api.TierStats`)."""
        view = asdict(self)
        view["recent_batch_sizes"] = list(self.recent_batch_sizes)
        view["step_time_s"] = None if self.step_time_s is None else list(self.step_time_s)
        view["per_replica"] = [snapshot.to_dict() for snapshot in self.per_replica]
        return view


def merge_snapshots(snapshots: Sequence[TierSnapshot]) -> TierLoad:
    """The tier's load over its replicas: sums of work, all recent batch sizes, mean step time and fit."""
    step_times = [s.seconds_per_step for s in snapshots if s.seconds_per_step is not None]
    fits = [s.step_time_s for s in snapshots if s.step_time_s]
    return TierLoad(
        queued=sum(s.queued for s in snapshots),
        in_flight=sum(s.in_flight for s in snapshots),
        queued_steps=sum(s.queued_steps for s in snapshots),
        replicas=len(snapshots),
        recent_batch_sizes=tuple(size for s in snapshots for size in s.recent_batch_sizes),
        seconds_per_step=(sum(step_times) / len(step_times)) if step_times else None,
        step_time_s=(sum(f[0] for f in fits) / len(fits), sum(f[1] for f in fits) / len(fits))
        if fits
        else None,
        requests_served=sum(s.requests_served for s in snapshots),
        request_capacity=request_capacity(snapshots),
        per_replica=tuple(snapshots),
    )


def request_capacity(snapshots: Sequence[TierSnapshot]) -> int | None:
    """How many requests one caller can have at the tier before Serve refuses more (BackPressureError):
    every replica's max_ongoing_requests plus the caller's own queue, max_queued_requests. None when a
    replica does not say or the queue is unbounded."""
    ongoing = [s.max_ongoing_requests for s in snapshots]
    queued = [s.max_queued_requests for s in snapshots]
    if not snapshots or any(n is None for n in ongoing) or any(q is None or q < 0 for q in queued):
        return None
    return sum(n for n in ongoing if n is not None) + max(q for q in queued if q is not None)
