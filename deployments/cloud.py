"""CloudRefiner: the heavy model. Refinements (img2img at the routed strength, step-level batched),
cloud-only text-to-image and the cloud part of EC-Diff / Hybrid SD (`plan`), batched by the library's
`CloudModel`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.tier import ServedTier, set_torch_threads
from diffusionx.engine.tiers import CloudModel
from diffusionx.models.loading import load_model
from diffusionx.requests import GenerationResult, Img2ImgRequest, PreviewRequest
from diffusionx.sampling.collaborative import CollaborativeRequest, PlanState


@serve.deployment(
    name="CloudRefiner",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=16,
    max_queued_requests=64,
    health_check_period_s=2,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
)
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
    ) -> None:
        set_torch_threads(torch_threads)
        engine = CloudModel(load_model(model, device=device), max_batch_size, step_batching)
        self._serve(engine, state, max_batch_size, batch_wait_timeout_s)

    async def refine(self, request: Img2ImgRequest) -> GenerationResult:
        return await self._submit("refine", request)

    async def refine_stream(self, request: Img2ImgRequest) -> AsyncIterator[tuple[str, Any]]:
        """`refine` with its progress, for `handle.options(stream=True)` (see `ServedTier._stream`)."""
        async for item in self._stream("refine", request):
            yield item

    async def generate(self, request: PreviewRequest) -> GenerationResult:
        return await self._submit("generate", request)

    async def plan(self, request: CollaborativeRequest) -> PlanState:
        """EC-Diff / Hybrid SD, cloud part: steps 0..s-1 (with noise approximation); the edge finishes."""
        return await self._submit("plan", request)
