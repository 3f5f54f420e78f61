"""EdgePreviewer: the light model. Previews (text-to-image), round-to-round edits (img2img) and the edge
part of EC-Diff / Hybrid SD (`finish`), batched by the library's `EdgeModel`. With `edit_predictor` (the
app's `edit_predictor_on: edge`) it also predicts the strength of an edit that names none
(`edit_predicted`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from PIL import Image
from ray import serve

from deployments.metrics import edit_preparation_metrics
from deployments.tier import ServedTier, lower_cpu_priority, set_torch_threads
from diffusionx.engine.host_share import HostIdle
from diffusionx.engine.tiers import EdgeModel
from diffusionx.models.loading import load_model
from diffusionx.policy.learned import edit_strength_function
from diffusionx.requests import (
    EditRequest,
    GenerationResult,
    Img2ImgRequest,
    PreviewRequest,
    with_predict_time,
)
from diffusionx.sampling.collaborative import PlanState


# Replicas, resources, request bounds and health checks come from the serve config (one place for each
# default); tests/unit/test_configs.py checks that no decorator option is also set there.
@serve.deployment(name="EdgePreviewer")
class EdgePreviewer(ServedTier):
    def __init__(
        self,
        model: str,
        state: Any = None,
        device: str | None = None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        torch_threads: int | None = None,
        edit_steps: int | None = None,
        prepare_edits: bool = False,
        idle_host: bool = True,
        nice: int = 0,
        edit_predictor: str | None = None,
        alignment_model: str | None = None,
    ) -> None:
        set_torch_threads(torch_threads)
        lower_cpu_priority(nice)
        predict_edit = None
        if edit_predictor is not None:  # the app's edit_predictor_on: edge
            predict_edit = edit_strength_function(edit_predictor, alignment_model)
        loaded = load_model(model, device=device)
        engine = EdgeModel(
            loaded,
            max_batch_size,
            edit_steps,
            predict_edit,
            prepare_edits=prepare_edits,
            prepare_gate=HostIdle() if idle_host and loaded.device.type == "cpu" else None,
        )
        self._serve(engine, state, max_batch_size, batch_wait_timeout_s)
        if engine.preparation is not None:
            metrics = edit_preparation_metrics()
            engine.preparation.on_result = metrics.result
            engine.preparation.encoded.on_lookup = metrics.lookup

    async def preview(self, request: PreviewRequest) -> GenerationResult:
        return await self._submit("preview", request)

    async def edit(self, request: Img2ImgRequest) -> GenerationResult:
        return await self._submit("edit", request)

    async def preview_stream(self, request: PreviewRequest) -> AsyncIterator[tuple[str, Any]]:
        """`preview` with its progress, for `handle.options(stream=True)` (see `ServedTier._stream`)."""
        async for item in self._stream("preview", request):
            yield item

    async def edit_stream(self, request: Img2ImgRequest) -> AsyncIterator[tuple[str, Any]]:
        async for item in self._stream("edit", request):
            yield item

    async def edit_predicted(self, request: EditRequest) -> GenerationResult:
        """An edit at this replica's predicted strength (with `edit_predictor`): one hop for both."""
        edit, predict_ms = await self.engine.predicted(request)
        return with_predict_time(await self._submit("edit", edit), predict_ms)

    async def edit_predicted_stream(self, request: EditRequest) -> AsyncIterator[tuple[str, Any]]:
        edit, predict_ms = await self.engine.predicted(request)
        async for kind, item in self._stream("edit", edit):
            yield kind, with_predict_time(item, predict_ms) if kind == "result" else item

    async def prepare_edit(self, image: Image.Image) -> None:
        """The ingress answered `image` and its session will probably edit it: prepare that edit while this
        replica is idle (returns at once)."""
        await self.engine.prepare_edit(image)

    async def finish(self, state: PlanState) -> GenerationResult:
        """EC-Diff / Hybrid SD, edge part: steps s..N-1 from the cloud's latents, then decode."""
        return await self._submit("finish", state)
