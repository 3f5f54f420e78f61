"""StrengthPredictor: predicts the img2img strength a preview needs before cloud refinement (`predict`) and
the strength of a round-to-round edit (`predict_edit`), batched by the library's `PredictorModel`. Which
predictors it serves is configured by name: a shipped learned predictor (`shapes-refine`, `shapes-edit`,
which read the `shapes-clip` alignment model) or `heuristic`."""

from __future__ import annotations

from typing import Any

from PIL import Image
from ray import serve

from deployments.tier import ServedTier, set_torch_threads
from diffusionx.engine.tiers import PredictorModel
from diffusionx.policy.learned import edit_strength_function, strength_function


@serve.deployment(
    name="StrengthPredictor",
    max_queued_requests=256,  # no config sets these two
    health_check_period_s=2,
)
class StrengthPredictor(ServedTier):
    def __init__(
        self,
        state: Any = None,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.0,
        refine_predictor: str = "shapes-refine",
        edit_predictor: str = "shapes-edit",
        alignment_model: str | None = None,
    ) -> None:
        set_torch_threads(1)
        refine = strength_function(refine_predictor, alignment_model)
        edit = edit_strength_function(edit_predictor, alignment_model)
        engine = PredictorModel(refine, max_batch_size, predict_edit=edit)
        self._serve(engine, state, max_batch_size, batch_wait_timeout_s)

    async def predict(self, prompt: str, image: Image.Image) -> float:
        return await self._submit("predict", prompt, image)

    async def predict_edit(
        self, prompt: str, image: Image.Image, previous_prompt: str | None = None
    ) -> float:
        return await self._submit("predict_edit", prompt, image, previous_prompt)
