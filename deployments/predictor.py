"""StrengthPredictor: predicts the img2img strength a preview needs before cloud refinement (batched)."""

from __future__ import annotations

from typing import Any

from PIL import Image
from ray import serve

from deployments.tier import MAX_CONCURRENT_BATCHES, BatchedTier
from diffusionx.policy.strength import predict_strength


@serve.deployment(
    name="StrengthPredictor",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    max_queued_requests=256,
    health_check_period_s=2,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
)
class StrengthPredictor(BatchedTier):
    def __init__(
        self, state: Any = None, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01
    ) -> None:
        self._init_tier("predictor", state, torch_threads=1, max_batch_size=max_batch_size)
        self._predict_batch.set_max_batch_size(max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def info(self) -> dict:
        return {"predictor": "heuristic", "module": "diffusionx.policy.strength"}

    async def predict(self, prompt: str, image: Image.Image) -> float:
        return await self._submit(self._predict_batch, (prompt, image), 0)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _predict_batch(self, items: list[tuple]) -> list[float]:
        return await self._compute(
            "predict", lambda pairs: [predict_strength(p, image) for p, image in pairs], items
        )
