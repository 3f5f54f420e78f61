"""CloudRefiner: the heavy model. Batched refinements (img2img at the routed strength), cloud-only
text-to-image, and the cloud part of EC-Diff / Hybrid SD (`plan`). The library buckets refinements by
strength inside a batch."""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.tier import MAX_CONCURRENT_BATCHES, BatchedTier
from diffusionx.collaborative import CollaborativeRequest, PlanState, cloud_phase, expected_unet_calls
from diffusionx.generation import check_prompt_fits, refine, text_to_image
from diffusionx.loading import load_model
from diffusionx.requests import GenerationResult, Img2ImgRequest, PreviewRequest
from diffusionx.step_batching import StepBatcher
from diffusionx.step_warmup import measure_step_time


@serve.deployment(
    name="CloudRefiner",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=16,
    max_queued_requests=64,
    health_check_period_s=2,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
)
class CloudRefiner(BatchedTier):
    def __init__(
        self,
        model: str,
        state: Any = None,
        device: str | None = None,
        max_batch_size: int = 4,
        batch_wait_timeout_s: float = 0.05,
        torch_threads: int | None = None,
        step_batching: bool = True,
    ) -> None:
        self._init_tier("cloud", state, torch_threads, max_batch_size)
        self.model = load_model(model, device=device)
        if step_batching:  # refinements of any strength share UNet batches, joining between steps
            self._enable_step_batching("refine", StepBatcher(self.model, max_batch_size, tier="cloud"))
        # the router's service model has a step time before the first refinement
        self._monitor.step_time.seed(measure_step_time(self.model, max_batch_size))
        for method in (self._refine_batch, self._generate_batch, self._plan_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def info(self) -> dict:
        spec = self.model.spec
        return {"model": spec.name, "default_steps": spec.default_steps, "family": spec.family}

    async def refine(self, request: Img2ImgRequest) -> GenerationResult:
        check_prompt_fits(self.model, [request.prompt])
        if request.num_inference_steps is None:
            request.num_inference_steps = self.model.spec.default_steps
        return await self._submit(
            self._refine_batch, request, int(request.num_inference_steps * request.strength)
        )

    async def generate(self, request: PreviewRequest) -> GenerationResult:
        check_prompt_fits(self.model, [request.prompt])
        steps = request.num_inference_steps or self.model.spec.default_steps
        return await self._submit(self._generate_batch, request, steps)

    async def plan(self, request: CollaborativeRequest) -> PlanState:
        """EC-Diff / Hybrid SD, cloud part: steps 0..s-1 (with noise approximation); the edge finishes."""
        check_prompt_fits(self.model, [request.prompt])
        return await self._submit(self._plan_batch, request, expected_unet_calls(request.params).cloud)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _plan_batch(self, items: list[tuple]) -> list[PlanState]:
        return await self._compute("plan", lambda requests: cloud_phase(self.model, requests), items)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _refine_batch(self, items: list[tuple]) -> list[GenerationResult]:
        return await self._compute("refine", lambda requests: refine(self.model, requests), items)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _generate_batch(self, items: list[tuple]) -> list[GenerationResult]:
        return await self._compute(
            "generate", lambda requests: text_to_image(self.model, requests, tier="cloud"), items
        )
