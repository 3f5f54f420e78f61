"""What every batched model tier replica shares: a TierMonitor, reporting to SharedState, and one model
loop that runs the library's blocking batch functions off the event loop.

Why a model loop behind `@serve.batch`: Serve forms a batch as soon as its wait timeout expires, even
while the model is still busy with the previous one (the `max_concurrent_batches` semaphore is taken after
the batch is formed). Under load that leaves many small batches queued behind the running one. So each
`@serve.batch` handler hands its batch to `_compute`, and the model loop, whenever the model is free,
merges every waiting batch of the same kind (up to `max_batch_size` requests) into one model call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from ray import serve

from diffusionx.tier_monitor import TierMonitor, snapshot_dict


@dataclass
class _PendingBatch:
    kind: str
    function: Callable[[list], list]
    items: Sequence[tuple]  # (request, steps, submitted_at)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class BatchedTier:
    tier: str = ""

    def _init_tier(self, tier: str, state: Any, torch_threads: int | None, max_batch_size: int = 8) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.tier = tier
        self.max_batch_size = max_batch_size
        self._state = state
        self._monitor = TierMonitor()
        self._pending: list[_PendingBatch] = []
        self._model_loop: asyncio.Task | None = None
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

    async def _compute(self, kind: str, function: Callable[[list], list], items: Sequence[tuple]) -> list:
        """Called by a @serve.batch handler: waits for the model loop to run this batch, returns results."""
        pending = _PendingBatch(kind, function, items)
        self._pending.append(pending)
        if self._model_loop is None or self._model_loop.done():
            self._model_loop = asyncio.get_running_loop().create_task(self._run_model_loop())
        return await pending.done

    def _take_merged(self) -> list[_PendingBatch]:
        """The oldest waiting batch plus later ones of the same kind, up to max_batch_size requests."""
        first = self._pending[0]
        taken, size = [first], len(first.items)
        for pending in self._pending[1:]:
            if pending.kind == first.kind and size + len(pending.items) <= self.max_batch_size:
                taken.append(pending)
                size += len(pending.items)
        self._pending = [p for p in self._pending if p not in taken]
        return taken

    async def _run_model_loop(self) -> None:
        while self._pending:
            merged = self._take_merged()
            items = [item for pending in merged for item in pending.items]
            requests = [request for request, _, _ in items]
            started = time.perf_counter()
            self._monitor.start_batch(len(items))
            try:
                results = await asyncio.to_thread(merged[0].function, requests)
            except Exception as error:
                for pending in merged:
                    pending.done.set_exception(error)
                continue
            finally:
                self._monitor.finish_batch(
                    len(items), [s for _, s, _ in items], time.perf_counter() - started
                )
                self._report()
            for result, (_, _, submitted) in zip(results, items, strict=True):
                if hasattr(result, "timings_ms"):
                    result.timings_ms["queue"] = round((started - submitted) * 1000.0, 3)
                    result.timings_ms["batch_size"] = float(len(items))
            offset = 0
            for pending in merged:
                pending.done.set_result(results[offset : offset + len(pending.items)])
                offset += len(pending.items)

    async def stats(self) -> dict:
        return snapshot_dict(self._monitor.snapshot())

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; doubles as the stats heartbeat."""
        self._report()
