"""What a request costs the tier that runs it: the one cost model of the codebase.

Every consumer of a request's size asks `request_cost`: the model loop (a job's load in its tier's
monitor), the cloud tier's request router (ranking replicas), admission control (the work a request adds
to a tier's queue, through `diffusionx.workflows.cost`) and the router policy's service model (the cloud
steps of a refinement, `RouteDecision.cloud_steps`). So replicas, router and admission count the same
numbers.

A cost has two counts. `steps` are the denoising steps the tier runs for the request; `unet_calls` are the
steps among them that evaluate the tier's UNet. They differ only for an EC-Diff plan, whose extrapolated
steps skip the UNet. A tier's load is counted in `unet_calls`: a step's time is its UNet call (an
extrapolated step costs a vector update), so queued work and the fitted step time share one unit.

Unset step counts take the tier's defaults (`StepDefaults`, from the tier's model): a preview its
`preview_steps`, an edit its `edit_steps`, anything else `default_steps`. An img2img request at strength
`s` of an `N`-step schedule runs `min(int(N * s), N)` steps (`sampling.generation.img2img`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusionx.requests import Img2ImgRequest, PreviewRequest, StrEnum
from diffusionx.sampling.collaborative import (
    CollaborationParams,
    CollaborativeRequest,
    PlanState,
    plan_steps,
)


class Work(StrEnum):
    """A tier method, as a kind of work: the model loop batches by it and the cost model prices it."""

    PREVIEW = "preview"  # edge: text-to-image (PreviewRequest)
    EDIT = "edit"  # edge: img2img of a previous image (Img2ImgRequest); also the refine fallback
    FINISH = "finish"  # edge: EC-Diff / Hybrid SD steps s..N-1 (PlanState)
    REFINE = "refine"  # cloud: img2img at the routed strength (Img2ImgRequest)
    GENERATE = "generate"  # cloud: text-to-image (PreviewRequest)
    PLAN = "plan"  # cloud: EC-Diff / Hybrid SD steps 0..s-1 (CollaborativeRequest)
    PREDICT = "predict"  # predictor: a refinement's strength
    PREDICT_EDIT = "predict_edit"  # predictor: an edit's strength

    @classmethod
    def of_method(cls, method: str) -> Work:
        """The work of a tier method name (`refine_stream` streams a `refine`)."""
        return cls(method.removesuffix("_stream"))


@dataclass(frozen=True)
class StepDefaults:
    """A tier's step counts for requests that set none (from its model's spec)."""

    default_steps: int
    preview_steps: int | None = None  # edge previews (None: default_steps)
    edit_steps: int | None = None  # the full schedule of an edge edit (None: default_steps)

    def steps_for(self, work: Work) -> int:
        """The schedule length of `work` when the request sets none."""
        if work is Work.PREVIEW and self.preview_steps:
            return self.preview_steps
        if work is Work.EDIT and self.edit_steps:
            return self.edit_steps
        return self.default_steps


@dataclass(frozen=True)
class Cost:
    """Denoising steps a request runs on its tier, and how many of them call the tier's UNet."""

    steps: int = 0
    unet_calls: int = 0


def img2img_steps(num_inference_steps: int, strength: float) -> int:
    """Steps of an img2img run: the last `strength` of a `num_inference_steps` schedule."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def text_cost(num_inference_steps: int) -> Cost:
    return Cost(num_inference_steps, num_inference_steps)


def img2img_cost(num_inference_steps: int, strength: float) -> Cost:
    steps = img2img_steps(num_inference_steps, strength)
    return Cost(steps, steps)


def plan_cost(params: CollaborationParams) -> Cost:
    """The cloud part of EC-Diff / Hybrid SD: steps 0..s-1, of which the approximated skip the UNet."""
    roles = plan_steps(params)[: params.switch_step]
    return Cost(len(roles), roles.count("cloud"))


def finish_cost(params: CollaborationParams, step_index: int) -> Cost:
    """The edge part of EC-Diff / Hybrid SD: steps `step_index`..N-1, every one an edge UNet call."""
    steps = params.num_inference_steps - step_index
    return Cost(steps, steps)


def request_cost(work: Work | str, request: Any, defaults: StepDefaults) -> Cost:
    """What `request` costs its tier as `work` (the module docstring)."""
    work = Work(work)
    if work in (Work.PREDICT, Work.PREDICT_EDIT):
        return Cost()
    if work is Work.PLAN:
        _check_type(work, request, CollaborativeRequest)
        return plan_cost(request.params)
    if work is Work.FINISH:
        _check_type(work, request, PlanState)
        return finish_cost(request.params, request.step_index)
    if work in (Work.EDIT, Work.REFINE):
        _check_type(work, request, Img2ImgRequest)
        return img2img_cost(request.num_inference_steps or defaults.steps_for(work), request.strength)
    _check_type(work, request, PreviewRequest)
    return text_cost(request.num_inference_steps or defaults.steps_for(work))


def _check_type(work: Work, request: Any, expected: type) -> None:
    if not isinstance(request, expected):
        raise TypeError(f"{work} takes a {expected.__name__}, got {type(request).__name__}")
