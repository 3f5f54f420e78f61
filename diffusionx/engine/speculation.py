"""Speculative refinements where they run: a cloud replica's `SpeculationStore`, and `LocalSpeculation`, the
in-process speculation tier the workflows use (eval, tests; the serving application has its own over
DeploymentHandles and the shared state, `deployments.speculation`).

A speculation is a background job of the replica's model loop (`ModelLoop.submit(..., background=True)`):
it runs only on capacity foreground work leaves, and is never load. The store keeps it by key until it is
claimed by a finalize, dropped (its session's newer preview superseded it) or older than `ttl_s`. A claim
of a finished one is a `hit` (its result at once). A running one is kept while the finalize has not
routed yet (`running`: the finalize claims it again once it knows its route), `promoted` when the
finalize would run the same refinement in the foreground (it becomes foreground work and the claim waits
for it), otherwise a `miss` (it is dropped). Its UNet calls are counted `used` (run in the background and then
answered a finalize) or `wasted` (run in the background and dropped).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from diffusionx.engine.model_loop import Job, ModelLoop
from diffusionx.policy.speculation import IfRunning, SpeculationPolicy, SpeculationRegistry


@dataclass
class Claimed:
    """What a claim found: `hit` or `promoted` with the refinement's result, `running` (kept, result None)
    or `miss` (result None). `strength`: what the speculation refines at (None on a miss)."""

    outcome: str
    result: Any = None
    strength: float | None = None


@dataclass
class _Held:
    job: Job
    created_at: float


@dataclass
class SpeculationStore:
    """A replica's speculations by key (module docstring). Not thread-safe: one event loop."""

    loop: ModelLoop
    kind: str = "refine"
    ttl_s: float = 120.0
    clock: Callable[[], float] = time.monotonic
    on_unet_calls: Callable[[str, int], None] = lambda outcome, calls: None  # ("used" | "wasted", n)
    unet_calls: dict[str, int] = field(default_factory=lambda: {"used": 0, "wasted": 0})
    _held: dict[str, _Held] = field(default_factory=dict)

    def submit(self, key: str, request: Any, steps: int) -> bool:
        """Starts a speculation of `request` (`steps` denoising steps) as background work; False when one
        with this key is already held (nothing new is started)."""
        self.expire()
        if key in self._held:
            return False
        job = self.loop.submit(self.kind, request, steps, background=True)
        job.future.add_done_callback(_retrieve)  # nobody may ever await a dropped one
        self._held[key] = _Held(job, self.clock())
        self.loop.release([job])
        return True

    async def claim(self, key: str, if_running: IfRunning) -> Claimed:
        """The speculation of `key` for a finalize (module docstring). It leaves the store unless it is
        running and `if_running` is "keep"."""
        self.expire()
        held = self._held.get(key)
        if held is None:
            return Claimed("miss")
        job = held.job
        if not job.future.done() and if_running == "keep":
            return Claimed("running")
        del self._held[key]
        if job.future.done():
            if not _succeeded(job):
                self._count("wasted", self._background_steps(job))
                return Claimed("miss")
            self._count("used", job.steps)
            return Claimed("hit", job.future.result())
        if if_running == "drop":
            self._drop(job)
            return Claimed("miss")
        self._count("used", self._background_steps(job))
        self.loop.promote(job)
        return Claimed("promoted", await self.loop.wait(job))

    def peek(self, key: str) -> Claimed:
        """The speculation of `key` without claiming it: `hit` with its result once it finished, `running`,
        or `miss` (none held, or it failed). It stays in the store until a claim, drop or its TTL."""
        self.expire()
        held = self._held.get(key)
        if held is None:
            return Claimed("miss")
        if not held.job.future.done():
            return Claimed("running")
        return Claimed("hit", held.job.future.result()) if _succeeded(held.job) else Claimed("miss")

    def drop(self, key: str) -> int:
        """Drops the speculation of `key` (superseded); returns the UNet calls it wasted."""
        held = self._held.pop(key, None)
        return 0 if held is None else self._drop(held.job)

    def expire(self) -> int:
        """Drops speculations older than the TTL; returns how many."""
        now = self.clock()
        old = [key for key, held in self._held.items() if now - held.created_at > self.ttl_s]
        for key in old:
            self._drop(self._held.pop(key).job)
        return len(old)

    @property
    def held(self) -> int:
        return len(self._held)

    def _drop(self, job: Job) -> int:
        wasted = self._background_steps(job)
        if not job.future.done():
            self.loop.cancel(job)
        self._count("wasted", wasted)
        return wasted

    @staticmethod
    def _background_steps(job: Job) -> int:
        """UNet calls the job ran as background work (a finished job ran all of them)."""
        if _succeeded(job):
            return job.steps
        return job.steps_done

    def _count(self, outcome: str, calls: int) -> None:
        if calls > 0:
            self.unet_calls[outcome] += calls
            self.on_unet_calls(outcome, calls)


def _succeeded(job: Job) -> bool:
    """Whether the job finished with a result (not running, cancelled or failed)."""
    future = job.future
    return future.done() and not future.cancelled() and future.exception() is None


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class LocalSpeculation:
    """The speculation tier in process: one `SpeculationRegistry` in front of one cloud tier's store
    (`CloudModel.speculations`). What the serving application does over handles, without them."""

    def __init__(
        self,
        store: SpeculationStore,
        policy: SpeculationPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        replica_id: str = "local",
    ) -> None:
        self.store = store
        self.policy = policy or SpeculationPolicy(ttl_s=store.ttl_s)
        self.registry = SpeculationRegistry(self.policy.ttl_s)
        self.clock = clock
        self.replica_id = replica_id

    async def replicas(self) -> list[dict]:
        return [self.store.loop.monitor.snapshot().to_dict()]

    async def submit(self, key: str, session: str, request: Any, steps: int) -> None:
        self.store.submit(key, request, steps)
        now = self.clock()
        for gone in self.registry.register(key, self.replica_id, session, now, request.strength):
            self.store.drop(gone.key)

    async def claim(self, key: str, strength: float | None, if_running: IfRunning) -> Claimed:
        entry = self.registry.locate(key, self.clock())
        if entry is None:
            return Claimed("miss")
        if strength is not None and strength != entry.strength:
            self.registry.count("miss")  # another strength: not this refinement (it stays for others)
            return Claimed("miss")
        claimed = await self.store.claim(key, if_running)
        if claimed.outcome != "running":
            self.registry.settle(key, claimed.outcome)
        return replace(claimed, strength=entry.strength)
