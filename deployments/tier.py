"""What every batched model tier replica shares: a TierMonitor, reporting to SharedState, and one model
loop that runs the library's blocking batch functions off the event loop.

Why a model loop behind `@serve.batch`: Serve forms a batch as soon as its wait timeout expires, even
while the model is still busy with the previous one (the `max_concurrent_batches` semaphore is taken after
the batch is formed). Under load that leaves many small batches queued behind the running one. So each
`@serve.batch` handler hands its batch to `_compute`, and the model loop, whenever the model is free,
merges every waiting batch of the same kind (up to `max_batch_size` requests) into one model call.

Kinds registered with `_enable_step_batching` (the cloud tier's refinements) go to a `StepBatcher`
instead: every sample carries its own timestep, new requests join between denoising steps and finished
ones leave, so refinements of different strengths share UNet batches. The loop alternates one step of
that engine with one whole batch of any other kind, so neither starves.
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

from diffusionx.step_batching import StepBatcher, Ticket
from diffusionx.tier_monitor import TierMonitor, snapshot_dict

# Serve batches handed on to the model loop at once. With the default 1, Serve holds back the next batch
# until the model loop finished the previous one, so nothing could be merged.
MAX_CONCURRENT_BATCHES = 4


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
        self._monitor.max_batch_size = max_batch_size
        self._pending: list[_PendingBatch] = []
        self._model_loop: asyncio.Task | None = None
        self._step_kind: str | None = None
        self._engine: StepBatcher | None = None
        # id(ticket) -> (its serve.batch batch, index in it, queue time in ms)
        self._tickets: dict[int, tuple[_PendingBatch, int, float]] = {}
        self._waiting_rows: dict[int, int] = {}  # id(pending batch) -> rows not finished yet
        self._results: dict[int, list] = {}
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

    def _enable_step_batching(self, kind: str, engine: StepBatcher) -> None:
        """Batches of `kind` (img2img requests) run step by step in `engine` instead of whole."""
        self._step_kind, self._engine = kind, engine

    async def _submit(self, batch_method: Callable, request: Any, steps: int) -> Any:
        """Queues `request` for `batch_method` (a @serve.batch method) and returns its result."""
        self._monitor.enqueue(steps)
        self._report()
        result = await batch_method((request, steps, time.perf_counter()))
        if isinstance(result, BaseException):  # one request of a batch failed; the others did not
            raise result
        return result

    async def _compute(self, kind: str, function: Callable[[list], list], items: Sequence[tuple]) -> list:
        """Called by a @serve.batch handler: waits for the model loop to run this batch, returns results."""
        pending = _PendingBatch(kind, function, items)
        self._pending.append(pending)
        if self._model_loop is None or self._model_loop.done():
            self._model_loop = asyncio.get_running_loop().create_task(self._run_model_loop())
        return await pending.done

    def _take_merged(self, skip_kind: str | None = None) -> list[_PendingBatch]:
        """The oldest waiting batch (not of `skip_kind`) plus later ones of its kind, up to max_batch_size
        requests."""
        first = next(p for p in self._pending if p.kind != skip_kind)
        taken, size = [first], len(first.items)
        for pending in self._pending:
            if (
                pending is not first
                and pending.kind == first.kind
                and size + len(pending.items) <= self.max_batch_size
            ):
                taken.append(pending)
                size += len(pending.items)
        self._pending = [p for p in self._pending if p not in taken]
        return taken

    def _engine_busy(self) -> bool:
        return self._engine is not None and not self._engine.idle

    async def _run_model_loop(self) -> None:
        while self._pending or self._engine_busy():
            if self._engine is not None:
                await self._admit_to_engine()
                if self._engine_busy():
                    await self._engine_step()
            if any(p.kind != self._step_kind for p in self._pending):
                await self._run_whole_batch()

    async def _admit_to_engine(self) -> None:
        joining = [p for p in self._pending if p.kind == self._step_kind]
        if not joining:
            return
        self._pending = [p for p in self._pending if p.kind != self._step_kind]
        engine = self._engine
        assert engine is not None

        def add_all() -> list[list[Ticket | BaseException]]:
            added: list[list[Ticket | BaseException]] = []
            for pending in joining:
                row: list[Ticket | BaseException] = []
                for request, _, _ in pending.items:
                    try:
                        row.append(engine.add(request))
                    except Exception as error:  # this request fails alone
                        row.append(error)
                added.append(row)
            return added

        added = await asyncio.to_thread(add_all)
        admitted = time.perf_counter()
        self._monitor.pool = engine.priorities()
        for pending, row in zip(joining, added, strict=True):
            self._monitor.admit(len(row))
            self._results[id(pending)] = [None] * len(row)
            self._waiting_rows[id(pending)] = len(row)
            for index, (entry, (_, steps, submitted)) in enumerate(zip(row, pending.items, strict=True)):
                if isinstance(entry, BaseException):
                    self._finish_row(pending, index, entry, steps)
                elif entry.done:  # strength 0: nothing to run
                    self._finish_row(pending, index, entry.result, steps)
                else:
                    self._tickets[id(entry)] = (pending, index, round((admitted - submitted) * 1000.0, 3))

    async def _engine_step(self) -> None:
        engine = self._engine
        assert engine is not None
        started = time.perf_counter()
        finished = await asyncio.to_thread(engine.step)
        batch_size = engine.recent_batch_sizes[-1] if engine.recent_batch_sizes else 0
        self._monitor.ran(batch_size, 1, time.perf_counter() - started)
        self._monitor.progressed(batch_size)
        self._monitor.pool = engine.priorities()
        for ticket in finished:
            pending, index, queue_ms = self._tickets.pop(id(ticket))
            result = ticket.result
            if result is not None:
                result.timings_ms["queue"] = queue_ms
                result.timings_ms["batch_size"] = float(result.batch_size)
            self._finish_row(pending, index, result, 0)
        self._report()

    def _finish_row(self, pending: _PendingBatch, index: int, result: Any, unfinished_steps: int) -> None:
        self._results[id(pending)][index] = result
        self._monitor.progressed(unfinished_steps)
        self._monitor.completed(1)
        self._waiting_rows[id(pending)] -= 1
        if self._waiting_rows[id(pending)] == 0:
            del self._waiting_rows[id(pending)]
            pending.done.set_result(self._results.pop(id(pending)))

    async def _run_whole_batch(self) -> None:
        """The oldest waiting batch of a whole-batch kind, merged with others of its kind, in one call."""
        merged = self._take_merged(skip_kind=self._step_kind)
        items = [item for pending in merged for item in pending.items]
        requests = [request for request, _, _ in items]
        started = time.perf_counter()
        self._monitor.start_batch(len(items))
        try:
            results = await asyncio.to_thread(merged[0].function, requests)
        except Exception as error:
            for pending in merged:
                pending.done.set_exception(error)
            return
        finally:
            self._monitor.finish_batch(len(items), [s for _, s, _ in items], time.perf_counter() - started)
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
