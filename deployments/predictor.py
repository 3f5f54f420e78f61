"""StrengthPredictor: predicts the img2img strength a preview needs before cloud refinement, batched by
the library's `PredictorModel`."""

from __future__ import annotations

from typing import Any

from PIL import Image
from ray import serve

from deployments.tier import ServedTier, set_torch_threads
from diffusionx.engine.tiers import PredictorModel


@serve.deployment(
    name="StrengthPredictor",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    max_queued_requests=256,
    health_check_period_s=2,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
)
class StrengthPredictor(ServedTier):
    def __init__(
        self, state: Any = None, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.0
    ) -> None:
        set_torch_threads(1)
        self._serve(
            PredictorModel(max_batch_size=max_batch_size), state, max_batch_size, batch_wait_timeout_s
        )

    async def predict(self, prompt: str, image: Image.Image) -> float:
        return await self._submit("predict", prompt, image)
