"""Per-replica bookkeeping of a model tier: queue, in-flight work, batch sizes and step time.

Each replica owns one `TierMonitor`; its `TierSnapshot`s from all replicas are merged by `merge_snapshots`
into the `TierLoad` that `/v1/stats` shows, admission control reads and the router reads as cloud load.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from diffusionx.policy.busy import BusyShare
from diffusionx.policy.load import TierLoad, TierSnapshot, merge_snapshots, request_capacity
from diffusionx.policy.service_model import StepTimeModel

__all__ = ["TierLoad", "TierMonitor", "TierSnapshot", "merge_snapshots", "request_capacity"]


class TierMonitor:
    """Counts work entering and leaving a replica's batch queue. Not thread-safe by design: it is only
    touched from the replica's event loop."""

    def __init__(self, history: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.queued = 0
        self.in_flight = 0
        self.queued_steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=history)
        self.requests_served = 0
        self.step_time = StepTimeModel()  # seconds per batched step against batch size
        self.pool: list[tuple[int, int]] = []  # set by a step-batching tier after each step
        self.max_batch_size = 1
        self.max_ongoing_requests: int | None = None  # set by the serving replica
        self.max_queued_requests: int | None = None
        self.host_idle: Callable[[], bool] = lambda: True  # the loop's background gate, when it has one
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
            self.step_time.observe(batch_size, elapsed_s / steps)

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

    @property
    def seconds_per_step(self) -> float | None:
        """The fitted step time at the mean recent batch size (the one step-time estimator, `t(b)`)."""
        sizes = self.batch_sizes or [self.max_batch_size]
        return self.step_time.predict(round(sum(sizes) / len(sizes)))

    def snapshot(self, default_steps: int | None = None) -> TierSnapshot:
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
            default_steps=default_steps,
            background_requests=self.background_requests,
            background_steps=self.background_steps,
            speculative_unet_calls=dict(self.speculative_unet_calls),
            busy_share=self.busy.at(self.clock()),
            host_idle=self.host_idle(),
        )
