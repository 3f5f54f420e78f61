"""EdgePreviewer: the light model. Batched previews (text-to-image), round-to-round edits (img2img) and
the edge part of EC-Diff / Hybrid SD (`finish`)."""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.tier import MAX_CONCURRENT_BATCHES, BatchedTier
from diffusionx.models.loading import load_model
from diffusionx.requests import GenerationResult, Img2ImgRequest, PreviewRequest
from diffusionx.sampling.collaborative import PlanState, edge_phase
from diffusionx.sampling.generation import check_prompt_fits, edit, preview


@serve.deployment(
    name="EdgePreviewer",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
    max_queued_requests=128,
    health_check_period_s=2,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8},
)
class EdgePreviewer(BatchedTier):
    def __init__(
        self,
        model: str,
        state: Any = None,
        device: str | None = None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.05,
        torch_threads: int | None = None,
        edit_steps: int | None = None,
    ) -> None:
        self._init_tier("edge", state, torch_threads, max_batch_size)
        self.model = load_model(model, device=device)
        self.edit_steps = edit_steps or self.model.spec.default_steps
        for method in (self._preview_batch, self._edit_batch, self._finish_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def info(self) -> dict:
        spec = self.model.spec
        return {"model": spec.name, "default_size": spec.default_size, "preview_steps": spec.preview_steps}

    async def preview(self, request: PreviewRequest) -> GenerationResult:
        check_prompt_fits(self.model, [request.prompt])  # reject before joining a batch
        steps = request.num_inference_steps or self.model.spec.preview_steps
        return await self._submit(self._preview_batch, request, steps)

    async def edit(self, request: Img2ImgRequest) -> GenerationResult:
        check_prompt_fits(self.model, [request.prompt])
        if request.num_inference_steps is None:
            request.num_inference_steps = self.edit_steps
        return await self._submit(
            self._edit_batch, request, int(request.num_inference_steps * request.strength)
        )

    async def finish(self, state: PlanState) -> GenerationResult:
        """EC-Diff / Hybrid SD, edge part: steps s..N-1 from the cloud's latents, then decode."""
        steps = state.params.num_inference_steps - state.step_index
        return await self._submit(self._finish_batch, state, steps)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _finish_batch(self, items: list[tuple]) -> list[GenerationResult]:
        return await self._compute("finish", lambda states: edge_phase(self.model, states), items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _preview_batch(self, items: list[tuple]) -> list[GenerationResult]:
        return await self._compute("preview", lambda requests: preview(self.model, requests), items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _edit_batch(self, items: list[tuple]) -> list[GenerationResult]:
        return await self._compute("edit", lambda requests: edit(self.model, requests), items)
