"""What every batched model tier replica shares: a TierMonitor, reporting to SharedState, and running the
library's blocking batch functions off the event loop so the next batch can fill meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ray import serve

from diffusionx.tier_monitor import TierMonitor, snapshot_dict


class BatchedTier:
    tier: str = ""

    def _init_tier(self, tier: str, state: Any, torch_threads: int | None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.tier = tier
        self._state = state
        self._monitor = TierMonitor()
        self._lock = asyncio.Lock()
        self._pending_reports: set[asyncio.Task] = set()
        try:
            self._replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (unit tests)
            self._replica_id = f"{tier}-local"

    def _report(self) -> None:
        if self._state is None:
            return
        snapshot = snapshot_dict(self._monitor.snapshot())

        async def send() -> None:
            # stats are best effort; the request path must not fail on them
            with contextlib.suppress(Exception):
                await self._state.report.remote(self.tier, self._replica_id, snapshot)

        task = asyncio.get_running_loop().create_task(send())
        self._pending_reports.add(task)
        task.add_done_callback(self._pending_reports.discard)

    async def _submit(self, batch_method: Callable, request: Any, steps: int) -> Any:
        """Queues `request` for `batch_method` (a @serve.batch method) and returns its result."""
        self._monitor.enqueue(steps)
        self._report()
        return await batch_method((request, steps, time.perf_counter()))

    async def _compute(self, function: Callable[[list], list], items: Sequence[tuple]) -> list:
        """Runs `function` over one batch in a worker thread; adds queue time and batch size to results."""
        requests = [request for request, _, _ in items]
        steps = [s for _, s, _ in items]
        started = time.perf_counter()
        self._monitor.start_batch(len(items))
        try:
            async with self._lock:
                results = await asyncio.to_thread(function, requests)
        finally:
            self._monitor.finish_batch(len(items), steps, time.perf_counter() - started)
            self._report()
        for result, (_, _, submitted) in zip(results, items, strict=True):
            if hasattr(result, "timings_ms"):
                result.timings_ms["queue"] = round((started - submitted) * 1000.0, 3)
                result.timings_ms["batch_size"] = float(len(items))
        return results

    async def stats(self) -> dict:
        return snapshot_dict(self._monitor.snapshot())

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; doubles as the stats heartbeat."""
        self._report()
