"""CloudRefiner: the heavy model. Refinements (img2img at the routed strength, step-level batched),
cloud-only text-to-image and the cloud part of EC-Diff / Hybrid SD (`plan`), batched by the library's
`CloudModel`. Each replica publishes its load with `record_routing_stats`, and the deployment's request
router (`deployments.cloud_router.StepAwareRouter`) sends a request to the replica where it is expected
to finish first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.metrics import speculation_metrics
from deployments.tier import ServedTier, lower_cpu_priority, set_torch_threads
from diffusionx.engine.host_share import HostIdle
from diffusionx.engine.speculation import Claimed
from diffusionx.engine.tiers import CloudModel
from diffusionx.models.loading import load_model
from diffusionx.policy.ahead import session_stats
from diffusionx.policy.sessions import SessionActivity
from diffusionx.policy.speculation import DEFAULT_MAX_SLOWDOWN, IfRunning, Pinned
from diffusionx.requests import GenerationResult, Img2ImgRequest, PreviewRequest
from diffusionx.sampling.collaborative import CollaborativeRequest, PlanState

logger = logging.getLogger("ray.serve")
SESSIONS_TIMEOUT_S = 1.0  # Serve waits on the stats hook; a slow shared state must not hold it


# Replicas, resources, request bounds, health checks and the request router come from the serve config (one
# place for each default); tests/unit/test_configs.py checks that no decorator option is also set there.
@serve.deployment(name="CloudRefiner")
class CloudRefiner(ServedTier):
    def __init__(
        self,
        model: str,
        state: Any = None,
        device: str | None = None,
        max_batch_size: int = 4,
        batch_wait_timeout_s: float = 0.0,
        torch_threads: int | None = None,
        step_batching: bool = True,
        step_order: str = "sjf",
        nice: int = 0,
        speculation_ttl_s: float = 120.0,
        background_max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
        idle_host: bool = True,
    ) -> None:
        set_torch_threads(torch_threads)
        lower_cpu_priority(nice)
        loaded = load_model(model, device=device)
        engine = CloudModel(
            loaded,
            max_batch_size,
            step_batching,
            step_order=step_order,
            speculation_ttl_s=speculation_ttl_s,
            background_max_slowdown=background_max_slowdown,
            background_gate=HostIdle() if idle_host and loaded.device.type == "cpu" else None,
        )
        self._serve(engine, state, max_batch_size, batch_wait_timeout_s)
        if engine.speculations is not None:
            engine.speculations.on_unet_calls = speculation_metrics().unet_calls_spent

    async def record_routing_stats(self) -> dict[str, Any]:
        """This replica's load for the request router; Serve calls it every request_routing_stats_period_s."""
        return self.engine.load_snapshot().to_dict()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The tier's work (`ServedTier`) and the sessions now previewing (read from SharedState), for the
        cloud policies (`QueuedStepsPolicy` reads the first, `AheadPolicy` both)."""
        stats = await super().record_autoscaling_stats()
        if self._state is not None:
            try:
                activity = await asyncio.wait_for(self._state.sessions.remote(), SESSIONS_TIMEOUT_S)
                stats.update(session_stats(SessionActivity(**activity)))
            except Exception as error:  # the shared state restarting: report the work alone meanwhile
                logger.debug("session activity unavailable: %s", error)
        return stats

    async def refine(self, request: Img2ImgRequest) -> GenerationResult:
        return await self._submit("refine", request)

    async def refine_stream(self, request: Img2ImgRequest) -> AsyncIterator[tuple[str, Any]]:
        """`refine` with its progress, for `handle.options(stream=True)` (see `ServedTier._stream`)."""
        async for item in self._stream("refine", request):
            yield item

    # -- speculative refinements (background work; `diffusionx.engine.speculation`) ----------------------
    async def speculate(self, request: Img2ImgRequest, key: str) -> str | None:
        """Starts a speculative refinement under `key` (or finds it held); returns this replica's id, where
        later calls about it are pinned, or None when this replica cannot speculate."""
        self.engine.speculate(key, request)
        self._on_change()
        return self._replica_id if self.engine.speculations is not None else None

    async def claim_speculation(self, pinned: Pinned, if_running: IfRunning) -> Claimed:
        """A finalize's claim: hit (the result), promoted (awaited as foreground work) or miss."""
        return await self.engine.claim_speculation(pinned.key, if_running)

    async def peek_speculation(self, pinned: Pinned) -> Claimed:
        """The speculation as it stands, not claimed: hit (finished, with its result), running or miss."""
        return self.engine.peek_speculation(pinned.key)

    async def drop_speculation(self, pinned: Pinned) -> int:
        """Drops a superseded or expired speculation; the UNet calls it wasted."""
        wasted = self.engine.drop_speculation(pinned.key)
        self._on_change()
        return wasted

    async def check_health(self) -> None:
        """Serve's health check (every health_check_period_s); also drops speculations past their TTL."""
        if self.engine.speculations is not None and self.engine.speculations.expire():
            self._on_change()
        await super().check_health()

    async def generate(self, request: PreviewRequest) -> GenerationResult:
        return await self._submit("generate", request)

    async def plan(self, request: CollaborativeRequest) -> PlanState:
        """EC-Diff / Hybrid SD, cloud part: steps 0..s-1 (with noise approximation); the edge finishes."""
        return await self._submit("plan", request)
