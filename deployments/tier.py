"""What every model tier deployment shares: the library's tier object (`diffusionx.engine.tiers`, with its
model loop) behind one `@serve.batch` queue, and load reports to SharedState.

`@serve.batch` is the replica's admission queue: it collects the requests that arrive together (without a
window by default: `batch_wait_timeout_s=0`) and hands them to the model loop at once, returning
immediately so that the next arrivals are handed over too; each caller then waits for its own job. The
model loop forms the model batches: a lone request runs at once, and requests that arrive while the model
is busy are merged into the next batch (see `diffusionx.engine.model_loop`). A caller that goes away
(client disconnected) cancels its job, which leaves the queue and gives its load back. The replica's
Prometheus metrics (`deployments.metrics.TierMetrics`) follow the model loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import torch
from ray import serve

from deployments.metrics import TierMetrics
from diffusionx.engine.model_loop import Job, ProgressCallback
from diffusionx.engine.progress import Report, stream_progress
from diffusionx.engine.reporter import CoalescingReporter
from diffusionx.policy.autoscaling import autoscaling_stats


class ServedTier:
    tier: str = ""

    def _serve(self, engine: Any, state: Any, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.engine = engine
        self.tier = engine.tier
        self._state = state
        try:
            context = serve.get_replica_context()
            self._replica_id = context.replica_id.unique_id
        except Exception:  # outside a replica
            context, self._replica_id = None, f"{self.tier}-local"
        # the request bounds Serve enforces for this deployment, reported so that admission control
        # refuses at the door before a caller's queue to this tier is full (unreported: no such bound).
        # Private: Serve has no public API for a replica's own deployment config (ReplicaContext keeps it
        # as `_deployment_config`); without it the bound is only lost.
        deployment_config = getattr(context, "_deployment_config", None)
        if deployment_config is not None:
            engine.loop.monitor.max_ongoing_requests = deployment_config.max_ongoing_requests
            engine.loop.monitor.max_queued_requests = deployment_config.max_queued_requests
        self._reporter = CoalescingReporter(self._send_report)
        self._metrics = TierMetrics(self.tier)
        engine.loop.observer = self._metrics
        engine.loop.on_change = self._on_change
        self._metrics.update(engine.loop.work())
        # @serve.batch's wrapper has these setters; its return type does not declare them
        batch_queue: Any = self._hand_over
        batch_queue.set_max_batch_size(max_batch_size)
        batch_queue.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _on_change(self) -> None:
        """The load changed: report it to SharedState (coalesced) and set the load gauges."""
        self._reporter.request()
        self._metrics.update(self.engine.loop.work())

    async def _send_report(self) -> None:
        if self._state is not None:
            snapshot = self.engine.loop.monitor.snapshot()
            await self._state.report.remote(self.tier, self._replica_id, snapshot)

    async def _submit(self, method: str, *args: Any, on_progress: ProgressCallback | None = None) -> Any:
        """Runs `method` of the tier object through the admission queue and the model loop."""
        loop = self.engine.loop
        job = loop.submit(*self.engine.job(method, *args), on_progress)  # a bad request fails here, alone
        try:
            await self._hand_over(job)
        except asyncio.CancelledError:
            loop.cancel(job)
            raise
        return await loop.wait(job)

    async def _stream(self, method: str, *args: Any) -> AsyncIterator[tuple[str, Any]]:
        """`_submit` as a stream for `handle.options(stream=True)`: `("progress", (step, total, tier))` after
        each denoising step, then `("result", result)`. When the caller goes away Serve cancels this
        generator, which cancels the job (it leaves the queue or the step batcher, its load is released)."""

        def run(report: Report) -> Awaitable[Any]:
            return self._submit(method, *args, on_progress=lambda step, total: report(step, total, self.tier))

        async for item in stream_progress(run):
            yield item

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _hand_over(self, jobs: list[Job]) -> list[None]:
        self.engine.loop.release(jobs)
        return [None] * len(jobs)

    async def info(self) -> dict:
        return await self.engine.info()

    async def stats(self) -> dict:
        return self.engine.loop.monitor.snapshot().to_dict()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook: the work this replica holds in batched steps, read by
        `diffusionx.policy.autoscaling.QueuedStepsPolicy` where a tier's config selects it."""
        return autoscaling_stats(self.engine.loop.monitor.snapshot().to_dict())

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; doubles as the stats heartbeat."""
        self._reporter.request()


def set_torch_threads(torch_threads: int | None) -> None:
    if torch_threads:
        torch.set_num_threads(torch_threads)


def lower_cpu_priority(nice: int) -> None:
    """Raises this replica process's niceness by `nice` (0: unchanged). On CPU serving the model's compute
    otherwise takes the cores from the HTTP path as much as from anything else, and under overload the
    503s that should arrive at once queue behind UNet steps."""
    if nice > 0:
        os.nice(nice)
