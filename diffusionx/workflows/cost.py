"""What a whole workflow costs each tier, before it runs: admission control's count of the work a request
adds to each tier's queue (tier -> UNet calls, `policy.cost`'s unit).

Each function sums `policy.cost` over the tier calls its workflow in `modes` makes, with the same defaults
the tiers apply. Where the workflow decides something only while it runs, the count takes the most it can
cost: a strength the predictor has yet to pick counts as 1.0. A refinement with a latency target counts
its edge fallback (the router fits the cloud work to the target or falls back to the edge, so the request
is refused at the door only when the fallback could not start either).
"""

from __future__ import annotations

from diffusionx.policy.cost import (
    StepDefaults,
    Work,
    finish_cost,
    img2img_cost,
    plan_cost,
    text_cost,
)
from diffusionx.requests import PreviewRequest
from diffusionx.workflows.modes import Mode, check_fields, collaboration_params

TierNeeds = dict[str, int]  # tier -> UNet calls the request adds there
UNKNOWN_STRENGTH = 1.0  # a strength to be predicted counts as the most it can cost


def preview_needs(
    edge: StepDefaults, *, is_edit: bool, num_inference_steps: int | None, strength: float | None
) -> TierNeeds:
    """A preview (`modes.preview`), or an edit of a previous image (`modes.edit`, `modes.edit_predicted`)."""
    if not is_edit:
        return {"edge": text_cost(num_inference_steps or edge.steps_for(Work.PREVIEW)).unet_calls}
    full = num_inference_steps or edge.steps_for(Work.EDIT)
    return {"edge": img2img_cost(full, UNKNOWN_STRENGTH if strength is None else strength).unet_calls}


def refine_needs(
    edge: StepDefaults,
    cloud: StepDefaults,
    *,
    num_inference_steps: int | None,
    strength: float | None,
    latency_target_ms: float | None,
) -> TierNeeds:
    """A refinement (`modes.refine`): the cloud's img2img, or with a latency target its edge fallback."""
    strength = UNKNOWN_STRENGTH if strength is None else strength
    if latency_target_ms is None:
        full = num_inference_steps or cloud.steps_for(Work.REFINE)
        return {"cloud": img2img_cost(full, strength).unet_calls}
    return {"edge": img2img_cost(edge.steps_for(Work.EDIT), strength).unet_calls}


def generate_needs(
    edge: StepDefaults,
    cloud: StepDefaults,
    mode: Mode | str,
    request: PreviewRequest,
    default_latency_target_ms: float | None = None,
) -> TierNeeds:
    """A one-shot generation in `mode` (`modes.generate`). Raises InvalidRequestError as `generate` would."""
    mode = Mode(mode)
    check_fields(mode, request)
    steps = request.num_inference_steps
    if mode is Mode.CLOUD:
        return {"cloud": text_cost(steps or cloud.steps_for(Work.GENERATE)).unet_calls}
    if mode is Mode.EDGE:
        return {"edge": text_cost(steps or edge.default_steps).unet_calls}
    if mode in (Mode.HYBRID, Mode.EC_DIFF):
        params = collaboration_params(mode, request, cloud.default_steps)
        return {
            "cloud": plan_cost(params).unet_calls,
            "edge": finish_cost(params, params.switch_step).unet_calls,
        }
    preview_steps = getattr(request, "preview_steps", None) or edge.steps_for(Work.PREVIEW)
    strength = getattr(request, "strength", None)
    latency_target_ms = getattr(request, "latency_target_ms", None) or default_latency_target_ms
    needs = refine_needs(
        edge, cloud, num_inference_steps=steps, strength=strength, latency_target_ms=latency_target_ms
    )
    needs["edge"] = needs.get("edge", 0) + text_cost(preview_steps).unet_calls
    return needs
