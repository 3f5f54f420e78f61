"""Every mode, written once, as an async workflow over tier callables.

The same functions run in the server and in process: the HTTP ingress hands them tiers backed by Ray Serve
DeploymentHandles, `diffusionx eval`, `compare`, `search` and the tests hand them in-process tiers
(`diffusionx.engine.tiers`). So what the experiments measure is what is served.

- `preview`: text-to-image on the edge tier (its preview step count unless the request sets one).
- `edit`: img2img of a previous image on the edge tier (a round-to-round edit); `edit_predicted` first asks
  the edit predictor for the strength (from the previous image, the new prompt and the previous prompt).
- `refine` (DiffusionX, `/v1/refine`): 1. strength: the request's if given (the predictor is then not
  called), else the predictor's; 2. route: the router trades strength and steps against the cloud load and
  the latency target; 3. a speculation of the same refinement (below) answers if it finished (`hit`), or is
  promoted and awaited if it runs and the route is that same full refinement (`promoted`); 4. otherwise
  (`miss`) refine on the cloud tier (or, on `edge-fallback`, img2img on the edge tier).
- `speculate`: after a preview or edit is answered, the refinement a `refine` of it would run (predicted
  strength, the cloud's full steps, no latency target) is submitted as background work of the cloud tier
  when the speculation policy allows (`diffusionx.policy.speculation`); a session's newer preview
  supersedes it.
- `generate` by mode:
  - `diffusionx` (default): `preview` at the preview step count, then `refine` of that preview;
  - `cloud`: text-to-image on the cloud tier (its default step count);
  - `edge`: text-to-image on the edge tier (its default step count, not the preview count);
  - `hybrid`: Hybrid SD, cloud for the first `switch_step` steps, edge for the rest;
  - `ec-diff`: EC-Diff, Hybrid SD plus the K-step noise approximation (p, k, a), defaults scaled from the
    reference `p=7, k=2, a=0.3, s=37` at 50 steps. The cloud's plan goes to the edge tier as it is (not
    awaited here), so a DeploymentResponse travels replica to replica without passing the ingress.

Every result's `unet_calls` sums all tiers' work for that image. A parameter that the chosen mode does not
use is refused, not ignored. Tier facts (`info`: default step counts) are fetched once per `Tiers`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from PIL import Image

from diffusionx.engine.speculation import Claimed
from diffusionx.policy.calibration import ArrivalRate, LatencyCalibration
from diffusionx.policy.router import CloudLoad, RouteDecision, RouterConfig, decide_route
from diffusionx.policy.speculation import IfRunning, SpeculationPolicy, speculation_key
from diffusionx.requests import (
    EditRequest,
    GenerationResult,
    Img2ImgRequest,
    InvalidRequestError,
    Mode,
    PreviewRequest,
    Route,
    TierInfo,
    check_steps,
    check_strength,
    with_predict_time,
)
from diffusionx.sampling.collaborative import CollaborationParams, CollaborativeRequest, PlanState

DEFAULT_MODE = Mode.DIFFUSIONX

# which optional request fields each mode reads
_MODE_FIELDS: dict[Mode, frozenset[str]] = {
    Mode.DIFFUSIONX: frozenset({"strength", "preview_steps", "latency_target_ms"}),
    Mode.CLOUD: frozenset(),
    Mode.EDGE: frozenset(),
    Mode.HYBRID: frozenset({"switch_step"}),
    Mode.EC_DIFF: frozenset({"switch_step", "warmup_steps", "approx_interval", "smoothing"}),
}
_OPTIONAL_FIELDS = tuple(sorted(set().union(*_MODE_FIELDS.values())))


# -- tiers -------------------------------------------------------------------------------------------------
# `on_progress(step, total, tier)`: called after each denoising step of that request (streamed progress)
Progress = Callable[[int, int, str], None]


class EdgeTier(Protocol):
    async def info(self) -> TierInfo: ...
    async def preview(
        self, request: PreviewRequest, on_progress: Progress | None = None
    ) -> GenerationResult: ...
    async def edit(
        self, request: Img2ImgRequest, on_progress: Progress | None = None
    ) -> GenerationResult: ...
    async def edit_predicted(  # only where `info()` names an `edit_predictor`
        self, request: EditRequest, on_progress: Progress | None = None
    ) -> GenerationResult: ...
    async def finish(self, state: Awaitable[PlanState]) -> GenerationResult: ...
    async def prepare_edit(self, image: Image.Image) -> None: ...  # only where `info()` has prepares_edits


class CloudTier(Protocol):
    async def info(self) -> TierInfo: ...
    async def refine(
        self, request: Img2ImgRequest, on_progress: Progress | None = None
    ) -> GenerationResult: ...
    async def generate(self, request: PreviewRequest) -> GenerationResult: ...
    def plan(self, request: CollaborativeRequest) -> Awaitable[PlanState]: ...


class SpeculationTier(Protocol):
    """Where speculative refinements are submitted and claimed (`engine.speculation.LocalSpeculation` in
    process; over handles and the shared state in the serving application)."""

    policy: SpeculationPolicy

    async def replicas(self) -> list[dict]: ...  # the cloud replicas' load reports (TierMonitor snapshots)
    async def submit(self, key: str, session: str, request: Img2ImgRequest, steps: int) -> None: ...
    async def claim(self, key: str, strength: float | None, if_running: IfRunning) -> Claimed: ...


class PredictorTier(Protocol):
    async def predict(self, prompt: str, image: Image.Image) -> float: ...
    async def predict_edit(self, prompt: str, image: Image.Image, previous_prompt: str | None) -> float: ...


@dataclass
class Tiers:
    """The tiers a workflow may call, and the router's settings. Unused tiers may be None."""

    edge: EdgeTier | None = None
    cloud: CloudTier | None = None
    predictor: PredictorTier | None = None
    cloud_load: Callable[[], Awaitable[CloudLoad]] | None = None  # None: an idle cloud (no wait)
    router: RouterConfig = field(default_factory=RouterConfig)
    default_latency_target_ms: float | None = None
    # the router's expected latencies are multiplied by its scale; whoever measures a refinement's latency
    # observes it (the ingress, over the whole request); None: uncorrected
    latency_calibration: LatencyCalibration | None = None
    # the rate of cloud work the router sends, for the service model's replay of later arrivals
    cloud_arrivals: ArrivalRate | None = None
    speculation: SpeculationTier | None = None  # None: no speculative refinement
    _info: dict[str, TierInfo] = field(default_factory=dict, repr=False)

    def need_edge(self, mode: str) -> EdgeTier:
        return _needed(self.edge, "edge", mode)

    def need_cloud(self, mode: str) -> CloudTier:
        return _needed(self.cloud, "cloud", mode)

    def need_predictor(self, mode: str) -> PredictorTier:
        return _needed(self.predictor, "predictor", mode)

    async def info(self, tier: str) -> TierInfo:
        """The edge or cloud tier's model facts, fetched once (they are fixed for a deployment)."""
        if tier not in self._info:
            model_tier = self.need_edge("info") if tier == "edge" else self.need_cloud("info")
            self._info[tier] = await model_tier.info()
        return self._info[tier]


TierT = TypeVar("TierT")


def _needed(value: TierT | None, tier: str, mode: str) -> TierT:
    if value is None:
        raise ValueError(f"mode '{mode}' needs the {tier} tier, but none was given")
    return value


# -- requests ------------------------------------------------------------------------------------------------
@dataclass
class GenerateRequest(PreviewRequest):
    """A one-shot text-to-image request; fields left None take the mode's defaults.

    `num_inference_steps` is N of the final image (the cloud refine's N in `diffusionx` mode).
    A plain `PreviewRequest` is accepted wherever a GenerateRequest is, with every mode default.
    """

    switch_step: int | None = None  # s (hybrid, ec-diff)
    warmup_steps: int | None = None  # p (ec-diff)
    approx_interval: int | None = None  # k (ec-diff)
    smoothing: float | None = None  # a (ec-diff)
    strength: float | None = None  # refine strength (diffusionx); None: predicted
    preview_steps: int | None = None  # edge preview steps (diffusionx)
    latency_target_ms: float | None = None  # router target (diffusionx)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strength is not None:
            check_strength(self.strength)
        if self.preview_steps is not None:
            check_steps(self.preview_steps, "preview_steps")
        # p, k, a and s are checked against N by CollaborationParams when the mode is known


def check_mode(mode: Mode | str) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        allowed = ", ".join(m.value for m in Mode)
        raise InvalidRequestError(f"mode={mode!r} is not allowed: use one of {allowed}") from None


def check_fields(mode: Mode | str, request: PreviewRequest) -> None:
    """Refuses a field the mode does not use, naming the modes that do."""
    mode = check_mode(mode)
    for name in _OPTIONAL_FIELDS:
        if getattr(request, name, None) is not None and name not in _MODE_FIELDS[mode]:
            users = [m for m, fields in _MODE_FIELDS.items() if name in fields]
            raise InvalidRequestError(
                f"{name} does not apply to mode '{mode}': it is a parameter of {' and '.join(users)}"
            )


def collaboration_params(
    mode: Mode | str, request: PreviewRequest, default_steps: int
) -> CollaborationParams:
    """The sampler parameters of a `hybrid` or `ec-diff` request (N defaults to the cloud's step count)."""
    steps = request.num_inference_steps or default_steps
    if mode == Mode.HYBRID:
        return CollaborationParams.hybrid(
            steps, switch_step=getattr(request, "switch_step", None), guidance_scale=request.guidance_scale
        )
    if mode == Mode.EC_DIFF:
        return CollaborationParams.ec_diff(
            steps,
            switch_step=getattr(request, "switch_step", None),
            warmup_steps=getattr(request, "warmup_steps", None),
            approx_interval=getattr(request, "approx_interval", None),
            smoothing=getattr(request, "smoothing", None),
            guidance_scale=request.guidance_scale,
        )
    raise InvalidRequestError(f"mode '{mode}' has no collaboration parameters; only hybrid and ec-diff do")


def _plain(request: PreviewRequest, steps: int | None) -> PreviewRequest:
    return PreviewRequest(
        request.prompt, request.seed, request.width, request.height, steps, request.guidance_scale
    )


def _progress(on_progress: Progress | None) -> dict[str, Progress]:
    """The keyword for a tier call: none without a listener, so tiers that stream nothing need no such
    parameter."""
    return {} if on_progress is None else {"on_progress": on_progress}


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


# -- workflows -----------------------------------------------------------------------------------------------
async def preview(
    tiers: Tiers, request: PreviewRequest, on_progress: Progress | None = None
) -> GenerationResult:
    """A fast preview on the edge tier."""
    return await tiers.need_edge("preview").preview(request, **_progress(on_progress))


async def edit(
    tiers: Tiers, request: Img2ImgRequest, on_progress: Progress | None = None
) -> GenerationResult:
    """A round-to-round edit of a previous image on the edge tier."""
    return await tiers.need_edge("edit").edit(request, **_progress(on_progress))


async def edit_predicted(
    tiers: Tiers,
    prompt: str,
    image: Image.Image,
    previous_prompt: str | None = None,
    *,
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    on_progress: Progress | None = None,
) -> GenerationResult:
    """An edit at the strength the edit predictor gives (the result's `strength` is the one it used): the
    edge tier's own when it has one (its `info` names an `edit_predictor`; one call), else the predictor
    tier's, then the edge's edit."""
    request = EditRequest(
        prompt,
        image,
        previous_prompt,
        seed=seed,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )
    edge = tiers.need_edge("edit")
    if (await tiers.info("edge")).get("edit_predictor"):
        return await edge.edit_predicted(request, **_progress(on_progress))
    start = time.perf_counter()
    strength = await tiers.need_predictor("edit").predict_edit(prompt, image, previous_prompt)
    predict_ms = _ms(start)
    result = await edit(tiers, request.at(float(strength)), on_progress)
    return with_predict_time(result, predict_ms)


@dataclass
class Refined:
    result: GenerationResult
    strength_predicted: float | None  # None when the request gave the strength (no prediction made)
    decision: RouteDecision
    load: CloudLoad
    timings_ms: dict[str, float]
    speculative: str = "off"  # hit | promoted | miss, or off (no speculation looked up)


async def speculate(
    tiers: Tiers,
    prompt: str,
    image: Image.Image,
    preview: str,
    *,
    session: str,
    seed: int = 0,
    guidance_scale: float | None = None,
) -> str | None:
    """Submits the refinement a finalize of this preview would run, as speculative background work of the
    cloud tier, when the policy allows; returns its key (None when nothing was submitted). `preview` is
    the preview's digest (`policy.speculation.preview_digest` of its PNG), `session` the session whose
    older speculation it supersedes."""
    speculation = tiers.speculation
    if speculation is None or speculation.policy.mode == "off":
        return None
    steps = int((await tiers.info("cloud"))["default_steps"])
    replicas = await speculation.replicas()
    if not speculation.policy.allows(replicas):  # a busy tier: not even a prediction
        return None
    strength = await tiers.need_predictor("speculation").predict(prompt, image)
    strength = check_strength(float(strength), "predicted strength")
    cloud_steps = int(steps * strength)
    if cloud_steps == 0 or not speculation.policy.allows(replicas, cloud_steps):
        return None
    key = speculation_key(preview, prompt, seed, steps, guidance_scale)
    request = Img2ImgRequest(
        prompt, image, strength, seed=seed, num_inference_steps=steps, guidance_scale=guidance_scale
    )
    await speculation.submit(key, session, request, cloud_steps)
    return key


async def refine(
    tiers: Tiers,
    prompt: str,
    image: Image.Image | Callable[[], Awaitable[Image.Image]],
    *,
    seed: int = 0,
    guidance_scale: float | None = None,
    strength: float | None = None,
    num_inference_steps: int | None = None,
    latency_target_ms: float | None = None,
    on_progress: Progress | None = None,
    preview: str | None = None,
    owner: str = "",
    owner_weight: float = 1.0,
) -> Refined:
    """DiffusionX's refinement: a finished speculation of it answers at once; otherwise predict the strength
    (unless given), route against the cloud load, then promote a running speculation of the same
    refinement or refine. `preview` is the preview's digest (the speculation's key needs it; None: no
    speculation is looked up). `on_progress` hears of each denoising step of a refinement run here (a
    speculation answers without them). `owner` and `owner_weight`: whose request it is
    (`Img2ImgRequest.owner`). `image` may be a function that decodes it: a hit never needs it."""
    cloud = tiers.need_cloud(Mode.DIFFUSIONX)
    timings: dict[str, float] = {}
    steps = num_inference_steps or int((await tiers.info("cloud"))["default_steps"])
    # 1. a speculation of this refinement: a finished one answers before anything is predicted or routed
    # (its strength was predicted from this preview and prompt when it was submitted); a running one is
    # kept until the route is known
    key = None
    claimed = Claimed("off")
    if tiers.speculation is not None and preview is not None:
        key = speculation_key(preview, prompt, seed, steps, guidance_scale)
        claimed = await tiers.speculation.claim(key, strength, "keep")
        if claimed.outcome == "hit":
            assert claimed.strength is not None and claimed.result is not None
            decision = _hit_decision(claimed.strength, steps)
            timings.update(claimed.result.timings_ms)
            predicted = claimed.strength if strength is None else None
            return Refined(claimed.result, predicted, decision, CloudLoad(), timings, "hit")
    if callable(image):
        image = await image()
    # 2. strength and cloud load, concurrently; the predictor only when the request gave no strength
    strength_predicted, load = await _strength_and_load(tiers, prompt, image, strength, timings)
    # 3. route: strength and steps against the load and the latency target
    target = latency_target_ms if latency_target_ms is not None else tiers.default_latency_target_ms
    wanted = strength if strength is not None else strength_predicted
    assert wanted is not None  # one of them is set by _strength_and_load
    decision = _route(tiers, wanted, steps, load, target)
    # 4. a running speculation is promoted when the route is that same full refinement, else dropped
    speculative = claimed.outcome
    if claimed.outcome == "running" and tiers.speculation is not None and key is not None:
        same = (
            decision.route is Route.CLOUD
            and decision.strength == claimed.strength
            and decision.num_inference_steps == steps
        )
        if_running: IfRunning = "promote" if same else "drop"
        claimed = await tiers.speculation.claim(key, claimed.strength, if_running)
        speculative = claimed.outcome
        if claimed.result is not None:  # promoted, or finished in the meantime (what it ran, not the route)
            assert claimed.strength is not None
            if speculative == "hit":
                decision = _hit_decision(claimed.strength, steps)
            else:
                decision = replace(decision, reason=f"{decision.reason}; a running speculation promoted")
            timings.update(claimed.result.timings_ms)
            return Refined(claimed.result, strength_predicted, decision, load, timings, speculative)
    if tiers.cloud_arrivals is not None:
        tiers.cloud_arrivals.record(decision.cloud_steps)
    # 5. refine on the cloud tier, or on the edge tier when the cloud cannot make the target. The edge
    # refines on its own edit schedule (None: the tier's `edit_steps`), not the cloud's: a fallback exists
    # to be fast, and the cloud's longer schedule on the edge would cost it several times its usual work
    # just when many refinements fall back at once.
    fallback = decision.route is Route.EDGE_FALLBACK
    request = Img2ImgRequest(
        prompt,
        image,
        decision.strength,
        seed=seed,
        num_inference_steps=None if fallback else decision.num_inference_steps,
        guidance_scale=guidance_scale,
        owner=owner,
        owner_weight=owner_weight,
    )
    progress = _progress(on_progress)
    if fallback:
        result = await tiers.need_edge(Route.EDGE_FALLBACK).edit(request, **progress)
        decision = replace(decision, num_inference_steps=result.num_inference_steps)
    else:
        result = await cloud.refine(request, **progress)
    timings.update(result.timings_ms)
    return Refined(result, strength_predicted, decision, load, timings, speculative)


def _hit_decision(strength: float, steps: int) -> RouteDecision:
    """The decision a finished speculation answered with: the full refinement it ran."""
    return RouteDecision(
        route=Route.CLOUD,
        strength=strength,
        num_inference_steps=steps,
        expected_latency_ms=None,  # nothing left to run: no prediction to make or check
        reason="answered by a finished speculative refinement of this preview",
    )


async def _strength_and_load(
    tiers: Tiers, prompt: str, image: Image.Image, strength: float | None, timings: dict[str, float]
) -> tuple[float | None, CloudLoad]:
    """The predicted strength (None when the request gave one) and the cloud load, fetched concurrently."""
    start = time.perf_counter()
    load_task = tiers.cloud_load() if tiers.cloud_load is not None else _idle_load()
    if strength is not None:
        return None, await load_task
    predictor = tiers.need_predictor(Mode.DIFFUSIONX)
    predicted, load = await asyncio.gather(predictor.predict(prompt, image), load_task)
    timings["predict"] = _ms(start)
    return check_strength(float(predicted), "predicted strength"), load


def _route(
    tiers: Tiers, strength: float, steps: int, load: CloudLoad, target_ms: float | None
) -> RouteDecision:
    """The router's decision with the tiers' calibration and arrival rate (the caller records the cloud work
    it sends)."""
    scale, margin = 1.0, 1.0
    if tiers.latency_calibration is not None:
        scale = tiers.latency_calibration.scale
        margin = tiers.latency_calibration.margin(tiers.router.slo_quantile)
    arrivals = tiers.cloud_arrivals.current() if tiers.cloud_arrivals is not None else None
    decision = decide_route(
        strength,
        steps,
        load,
        target_ms,
        tiers.router,
        latency_scale=scale,
        arrivals=arrivals,
        latency_margin=margin,
    )
    return decision


async def _idle_load() -> CloudLoad:
    return CloudLoad()


@dataclass
class Generated:
    result: GenerationResult  # unet_calls: every tier's work for the image
    parameters: dict[str, Any] = field(default_factory=dict)  # what the mode resolved (route, p, k, a, s)


async def generate(tiers: Tiers, mode: Mode | str, request: PreviewRequest) -> Generated:
    """One-shot text-to-image in `mode` (see the module docstring)."""
    check_fields(mode, request)
    mode = Mode(mode)
    # 1. single-model baselines
    if mode is Mode.CLOUD:
        cloud = tiers.need_cloud(mode)
        steps = request.num_inference_steps or int((await tiers.info("cloud"))["default_steps"])
        return Generated(await cloud.generate(_plain(request, steps)))
    if mode is Mode.EDGE:
        edge = tiers.need_edge(mode)
        steps = request.num_inference_steps or int((await tiers.info("edge"))["default_steps"])
        return Generated(await edge.preview(_plain(request, steps)))
    # 2. EC-Diff / Hybrid SD: the cloud plans steps 0..s-1, its latents go to the edge, which finishes
    if mode in (Mode.HYBRID, Mode.EC_DIFF):
        return await _generate_collaborative(tiers, mode, request)
    # 3. DiffusionX: edge preview, then predicted-strength cloud refine of the preview
    return await _generate_diffusionx(tiers, request)


async def _generate_collaborative(tiers: Tiers, mode: Mode, request: PreviewRequest) -> Generated:
    cloud, edge = tiers.need_cloud(mode), tiers.need_edge(mode)
    default_steps = int((await tiers.info("cloud"))["default_steps"])
    params = collaboration_params(mode, request, default_steps)
    plan = cloud.plan(
        CollaborativeRequest(request.prompt, request.seed, request.width, request.height, params)
    )
    result = await edge.finish(plan)  # the plan is handed over as it is, not fetched here
    return Generated(
        result,
        {
            "switch_step": params.switch_step,
            "warmup_steps": params.warmup_steps,
            "approx_interval": params.approx_interval if params.approximates else None,
            "smoothing": params.smoothing if params.approximates else None,
        },
    )


async def _generate_diffusionx(tiers: Tiers, request: PreviewRequest) -> Generated:
    previewed = await preview(tiers, _plain(request, getattr(request, "preview_steps", None)))
    final = await refine(
        tiers,
        request.prompt,
        previewed.image,
        seed=request.seed,
        guidance_scale=request.guidance_scale,
        strength=getattr(request, "strength", None),
        num_inference_steps=request.num_inference_steps,
        latency_target_ms=getattr(request, "latency_target_ms", None),
    )
    refined = final.result
    timings = {f"preview_{key}": value for key, value in previewed.timings_ms.items()}
    timings.update(final.timings_ms)
    result = GenerationResult(
        refined.image,
        refined.seed,
        previewed.unet_calls + refined.unet_calls,
        refined.num_inference_steps,
        refined.strength,
        timings,
        refined.batch_size,
    )
    parameters = {
        "route": final.decision.route,
        "strength_predicted": final.strength_predicted,
        "strength_used": final.decision.strength,
        "expected_latency_ms": final.decision.expected_latency_ms,
    }
    return Generated(result, parameters)
