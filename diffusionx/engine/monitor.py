"""Per-replica bookkeeping of a model tier: queue, in-flight work, batch sizes and step time.

Each replica owns one `TierMonitor`; snapshots from all replicas are merged by `merge_snapshots` into the
tier view that `/v1/stats` shows and that the router reads as cloud load.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from diffusionx.policy.busy import BusyShare
from diffusionx.policy.service_model import StepTimeModel


@dataclass
class TierSnapshot:
    queued: int = 0
    in_flight: int = 0
    queued_steps: int = 0  # steps of queued plus in-flight requests
    recent_batch_sizes: list[int] = field(default_factory=list)
    seconds_per_step: float | None = None
    requests_served: int = 0
    taken_at: float = 0.0
    # what the router's service model reads (service_model.ReplicaLoad.from_snapshot)
    pool: list[tuple[int, int]] = field(default_factory=list)  # step batcher: (key, remaining steps)
    max_batch_size: int = 1
    step_time_s: list[float] | None = None  # (t0, t1) of t(b) = t0 + t1 * b
    # the replica's request bounds as its deployment sets them (Serve's max_ongoing_requests and
    # max_queued_requests, the latter per caller, -1: unbounded); None outside a served replica
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    # speculative (background) work: not load, so in none of the fields above
    background_requests: int = 0
    background_steps: int = 0
    # UNet calls speculation ran in the background: "used" (answered a finalize) and "wasted" (dropped)
    speculative_unet_calls: dict[str, int] = field(default_factory=lambda: {"used": 0, "wasted": 0})
    # recent share of time with foreground work queued or running (`diffusionx.policy.busy`)
    busy_share: float = 0.0


class TierMonitor:
    """Counts work entering and leaving a replica's batch queue. Not thread-safe by design: it is only
    touched from the replica's event loop."""

    def __init__(
        self, history: int = 64, ema: float = 0.3, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.queued = 0
        self.in_flight = 0
        self.queued_steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=history)
        self.seconds_per_step: float | None = None
        self.requests_served = 0
        self._ema = ema
        self.step_time = StepTimeModel()  # seconds per batched step against batch size
        self.pool: list[tuple[int, int]] = []  # set by a step-batching tier after each step
        self.max_batch_size = 1
        self.max_ongoing_requests: int | None = None  # set by the serving replica
        self.max_queued_requests: int | None = None
        self.background_requests = 0  # set by the model loop: speculative work, not load
        self.background_steps = 0
        self.speculative_unet_calls = {"used": 0, "wasted": 0}  # counted by a SpeculationStore
        self.clock = clock
        self.busy = BusyShare()

    def _changed(self) -> None:
        self.busy.update(self.queued + self.in_flight > 0, self.clock())

    def enqueue(self, steps: int) -> None:
        self.queued += 1
        self.queued_steps += steps
        self._changed()

    def withdraw(self, steps: int) -> None:
        """A queued request left before it ran (cancelled, or failed before joining a batch)."""
        self.queued -= 1
        self.queued_steps -= steps
        self._changed()

    def admit(self, count: int) -> None:
        """`count` queued requests start running."""
        self.queued -= count
        self.in_flight += count
        self._changed()

    def ran(self, batch_size: int, steps: int, elapsed_s: float) -> None:
        """A model call ran `steps` denoising steps for `batch_size` requests in `elapsed_s`."""
        self.batch_sizes.append(batch_size)
        if steps > 0:
            measured = elapsed_s / steps
            self.step_time.observe(batch_size, measured)
            previous = self.seconds_per_step
            self.seconds_per_step = (
                measured if previous is None else (1 - self._ema) * previous + self._ema * measured
            )

    def progressed(self, steps: int) -> None:
        """`steps` request-steps of queued work are done."""
        self.queued_steps -= steps

    def completed(self, count: int) -> None:
        self.in_flight -= count
        self.requests_served += count
        self._changed()

    def abandon(self, remaining_steps: int) -> None:
        """A running request was cancelled with `remaining_steps` not run."""
        self.in_flight -= 1
        self.queued_steps -= remaining_steps
        self._changed()

    def snapshot(self) -> TierSnapshot:
        return TierSnapshot(
            queued=self.queued,
            in_flight=self.in_flight,
            queued_steps=self.queued_steps,
            recent_batch_sizes=list(self.batch_sizes),
            seconds_per_step=self.seconds_per_step,
            requests_served=self.requests_served,
            taken_at=time.time(),
            pool=list(self.pool),
            max_batch_size=self.max_batch_size,
            step_time_s=self.step_time.to_pair(),
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            background_requests=self.background_requests,
            background_steps=self.background_steps,
            speculative_unet_calls=dict(self.speculative_unet_calls),
            busy_share=self.busy.at(self.clock()),
        )


def merge_snapshots(snapshots: list[dict]) -> dict:
    """Tier view over its replicas: sums of work, all recent batch sizes, mean step time and fit."""
    step_times = [s["seconds_per_step"] for s in snapshots if s.get("seconds_per_step") is not None]
    fits = [s["step_time_s"] for s in snapshots if s.get("step_time_s")]
    return {
        "queued": sum(s["queued"] for s in snapshots),
        "in_flight": sum(s["in_flight"] for s in snapshots),
        "queued_steps": sum(s["queued_steps"] for s in snapshots),
        "replicas": len(snapshots),
        "recent_batch_sizes": [size for s in snapshots for size in s["recent_batch_sizes"]],
        "seconds_per_step": (sum(step_times) / len(step_times)) if step_times else None,
        # mean (t0, t1) of the replicas' fitted t(b) = t0 + t1 * b (admission control reads t(max batch))
        "step_time_s": [sum(fit[i] for fit in fits) / len(fits) for i in (0, 1)] if fits else None,
        "requests_served": sum(s["requests_served"] for s in snapshots),
        "request_capacity": request_capacity(snapshots),
        "per_replica": snapshots,  # the router's service model needs each replica's own load
    }


def request_capacity(snapshots: list[dict]) -> int | None:
    """How many requests one caller can have at the tier before Serve refuses more (BackPressureError):
    every replica's max_ongoing_requests plus the caller's own queue, max_queued_requests. None when a
    replica does not say or the queue is unbounded."""
    ongoing = [s.get("max_ongoing_requests") for s in snapshots]
    queued = [s.get("max_queued_requests") for s in snapshots]
    if not snapshots or None in ongoing or None in queued or min(queued) < 0:
        return None
    return sum(ongoing) + max(queued)


def snapshot_dict(snapshot: TierSnapshot) -> dict:
    return asdict(snapshot)
