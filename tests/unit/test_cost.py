"""One cost model: every kind of request, run through the in-process tiers, costs the same number of UNet
calls in the model loop (what the replica counts as load), in the cloud tier's request router, in
admission control's count for the whole HTTP request, and in the router policy's service model."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from deployments.cloud_router import request_steps
from diffusionx.engine.tiers import CloudModel, EdgeModel, PredictorModel
from diffusionx.policy.cost import Cost, StepDefaults, Work, request_cost
from diffusionx.requests import Img2ImgRequest, Mode, PreviewRequest
from diffusionx.sampling.collaborative import CollaborationParams, CollaborativeRequest
from diffusionx.workflows import cost, modes
from diffusionx.workflows.modes import GenerateRequest, Tiers


@dataclass
class Pending:
    """What the request router reads of a request: the method called and its arguments."""

    args: list[Any]
    method: str

    @property
    def metadata(self) -> Any:
        return type("Metadata", (), {"call_method": self.method})()


class Recorder:
    """In-process tiers whose every model-loop job is recorded as (tier, kind, request, steps)."""

    def __init__(self, cloud_model: Any, edge_model: Any) -> None:
        self.jobs: list[tuple[str, str, Any, int]] = []
        self.edge = EdgeModel(edge_model, edit_steps=6)
        self.cloud = CloudModel(cloud_model, warm_up=False)
        for tier in (self.edge, self.cloud):
            tier.job = self._recording(tier.tier, tier.job)  # type: ignore[method-assign]
        self.tiers = Tiers(edge=self.edge, cloud=self.cloud, predictor=PredictorModel())

    def _recording(self, tier: str, job: Any) -> Any:
        def recorded(method: str, request: Any) -> Any:
            spec = job(method, request)
            self.jobs.append((tier, spec.kind, request, spec.steps))
            return spec

        return recorded

    def per_tier(self) -> dict[str, int]:
        spent: dict[str, int] = defaultdict(int)
        for tier, _, _, steps in self.jobs:
            spent[tier] += steps
        return dict(spent)


@pytest.fixture
def recorder(tiny_cloud, tiny_edge) -> Recorder:
    return Recorder(tiny_cloud, tiny_edge)


def image() -> Image.Image:
    return Image.new("RGB", (32, 32), (200, 40, 40))


def check_loop_and_router(recorder: Recorder) -> None:
    """Each job's load is the cost model's, and the request router prices each cloud job the same."""
    defaults = {"edge": recorder.edge.defaults, "cloud": recorder.cloud.defaults}
    assert recorder.jobs
    for tier, kind, request, steps in recorder.jobs:
        assert steps == request_cost(kind, request, defaults[tier]).unet_calls
        if tier == "cloud":
            assert request_steps(Pending([request], kind), defaults["cloud"]) == steps  # type: ignore[arg-type]
            assert request_steps(Pending([request], f"{kind}_stream"), defaults["cloud"]) == steps  # type: ignore[arg-type]


def test_the_cost_of_each_kind_of_work():
    defaults = StepDefaults(default_steps=20, preview_steps=8, edit_steps=10)
    assert request_cost(Work.PREVIEW, PreviewRequest("a"), defaults) == Cost(8, 8)
    assert request_cost(Work.GENERATE, PreviewRequest("a"), defaults) == Cost(20, 20)
    assert request_cost(Work.EDIT, Img2ImgRequest("a", image(), 0.5), defaults) == Cost(5, 5)
    assert request_cost(Work.REFINE, Img2ImgRequest("a", image(), 0.5), defaults) == Cost(10, 10)
    assert (
        request_cost("refine", Img2ImgRequest("a", image(), 0.01, num_inference_steps=40), defaults) == Cost()
    )
    ec_diff = CollaborativeRequest("a", params=CollaborationParams())  # p=7, k=2, a=0.3, s=37 of N=50
    assert request_cost(Work.PLAN, ec_diff, defaults) == Cost(steps=37, unet_calls=17)
    assert request_cost(Work.PREDICT, ("a", image()), defaults) == Cost()
    with pytest.raises(TypeError, match="refine takes a Img2ImgRequest, got PreviewRequest"):
        request_cost(Work.REFINE, PreviewRequest("a"), defaults)


@pytest.mark.parametrize("steps", [None, 4])
def test_preview(recorder, steps):
    body = PreviewRequest("a red circle", seed=1, num_inference_steps=steps)
    asyncio.run(modes.preview(recorder.tiers, body))
    check_loop_and_router(recorder)
    needs = cost.preview_needs(
        recorder.edge.defaults, is_edit=False, num_inference_steps=steps, strength=None
    )
    assert needs == recorder.per_tier() == {"edge": steps or recorder.edge.model.spec.preview_steps}


@pytest.mark.parametrize(("steps", "strength"), [(None, 0.5), (8, 0.75), (8, 0.0)])
def test_edit(recorder, steps, strength):
    request = Img2ImgRequest("a blue circle", image(), strength, num_inference_steps=steps)
    asyncio.run(modes.edit(recorder.tiers, request))
    check_loop_and_router(recorder)
    needs = cost.preview_needs(
        recorder.edge.defaults, is_edit=True, num_inference_steps=steps, strength=strength
    )
    assert needs == recorder.per_tier()


def test_a_predicted_edit_is_admitted_at_the_most_it_can_cost(recorder):
    asyncio.run(modes.edit_predicted(recorder.tiers, "a blue circle", image(), "a red circle"))
    check_loop_and_router(recorder)
    needs = cost.preview_needs(recorder.edge.defaults, is_edit=True, num_inference_steps=None, strength=None)
    assert needs["edge"] >= recorder.per_tier()["edge"]


@pytest.mark.parametrize("strength", [0.1, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("steps", [None, 10])
def test_refine_at_several_strengths(recorder, strength, steps):
    refined = asyncio.run(
        modes.refine(recorder.tiers, "a red circle", image(), strength=strength, num_inference_steps=steps)
    )
    check_loop_and_router(recorder)
    needs = cost.refine_needs(
        recorder.edge.defaults,
        recorder.cloud.defaults,
        num_inference_steps=steps,
        strength=strength,
        latency_target_ms=None,
    )
    assert needs == recorder.per_tier()
    assert refined.decision.cloud_steps == needs["cloud"]  # the service model's count


@pytest.mark.parametrize("mode", list(Mode))
def test_generate_in_every_mode(recorder, mode):
    fields: dict[str, Any] = {"num_inference_steps": 10}
    if mode is Mode.DIFFUSIONX:
        fields["strength"] = 0.6
    if mode is Mode.EC_DIFF:
        fields.update(switch_step=8, warmup_steps=3, approx_interval=1)
    request = GenerateRequest("a red circle", seed=2, **fields)
    generated = asyncio.run(modes.generate(recorder.tiers, mode, request))
    check_loop_and_router(recorder)
    needs = cost.generate_needs(recorder.edge.defaults, recorder.cloud.defaults, mode, request)
    assert needs == recorder.per_tier()
    kinds = {kind for _, kind, _, _ in recorder.jobs}
    if mode in (Mode.HYBRID, Mode.EC_DIFF):
        assert kinds == {"plan", "finish"}
        assert needs["cloud"] == generated.result.unet_calls.cloud  # EC-Diff: its cloud UNet calls
    if mode is Mode.DIFFUSIONX:
        assert generated.parameters["strength_used"] == 0.6
