"""In-process tiers for the workflows: the tier objects of `diffusionx.engine.tiers` on loaded models.

Experiments (eval, compare, search) and tests run the served workflows through these, with the same model
loops (batch merging, step-level batching) that the deployments wrap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Literal

from diffusionx.engine.tiers import CloudModel, EdgeModel, PredictorModel, StrengthFunction
from diffusionx.models.loading import LoadedModel
from diffusionx.policy.router import RouterConfig
from diffusionx.policy.strength import EditStrengthFunction, heuristic_edit_strength, predict_strength
from diffusionx.requests import PreviewRequest
from diffusionx.workflows.modes import Generated, Tiers, generate


def local_tiers(
    cloud: LoadedModel | None,
    edge: LoadedModel | None,
    *,
    max_batch_size: int = 16,
    predict: StrengthFunction = predict_strength,
    predict_edit: EditStrengthFunction = heuristic_edit_strength,
    router: RouterConfig | None = None,
    edit_predictor_on: Literal["edge", "predictor"] = "predictor",
) -> Tiers:
    """Tiers over in-process models; each model loop merges up to `max_batch_size` concurrent requests.
    `edit_predictor_on` as the app arg: which tier predicts an edit's strength."""
    cloud_tier = CloudModel(cloud, max_batch_size) if cloud is not None else None
    on_edge = predict_edit if edit_predictor_on == "edge" else None
    return Tiers(
        edge=EdgeModel(edge, max_batch_size, predict_edit=on_edge) if edge is not None else None,
        cloud=cloud_tier,
        predictor=PredictorModel(predict, max_batch_size, predict_edit=predict_edit),
        cloud_load=cloud_tier.load if cloud_tier is not None else None,
        router=router or RouterConfig(),
    )


def generate_all(tiers: Tiers, mode: str, requests: Sequence[PreviewRequest]) -> list[Generated]:
    """`generate` for every request, concurrently (so the tiers batch them); results in request order."""

    async def run() -> list[Generated]:
        return list(await asyncio.gather(*(generate(tiers, mode, request) for request in requests)))

    return asyncio.run(run())
