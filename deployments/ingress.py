"""DiffusionXIngress: the HTTP API. (No `from __future__ import annotations` here: FastAPI must see real
body types on the route methods.) HTTP concerns only: schemas, PNG work off the event loop, and errors
(bad input -> 4xx with the reason, unknown preview id -> 404, overload -> 503 with Retry-After). What a
request does is the library's workflow (`diffusionx.workflows.modes`), handed tiers that call the tier
deployments through their DeploymentHandles. Preview and refine stream their progress as server-sent events
when asked (`deployments.sse`; the tiers' `*_stream` methods through `handle.options(stream=True)`); the
web page at `/` is `deployments.web`; metrics are `deployments.metrics`.

Reliability (DESIGN.md, "Reliability contract"): the guard (`diffusionx.serving.guard`) refuses bad bodies and
keys before a route runs; admission control (`diffusionx.policy.admission`) refuses work at once when the
tier it needs cannot start it within `admission_max_wait_s`; a tier call whose replica died is retried
once (Serve routes the retry to a live replica, waiting for the replacement if there is none), and an EC-Diff
plan lost with its cloud replica is planned again.

Speculation (`speculation: idle` in the app args): once a preview or edit is answered, the workflow's
`speculate` runs off the request's path (`deployments.speculation`), and a refine looks up a speculation
of its preview (identified by the PNG's digest, whether named by `preview_id` or sent as `image`) unless
its body says `"speculation": "off"`."""

import asyncio
import base64
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve

from deployments.handles import CloudHandle, EdgeHandle, PredictorHandle, ask
from deployments.metrics import RETRY_HEADER, ingress_metrics, metrics_url
from deployments.speculation import HandleSpeculation
from deployments.sse import event_stream, wants_events
from deployments.web import add_web_page
from diffusionx import imaging
from diffusionx.api import (
    ErrorResponse,
    GenerateBody,
    GenerateResponse,
    PreviewBody,
    PreviewResponse,
    RefineBody,
    RefineResponse,
    StatsResponse,
)
from diffusionx.app_config import AppArgs
from diffusionx.policy.admission import AdmissionControl
from diffusionx.policy.calibration import ArrivalRate, LatencyCalibration
from diffusionx.policy.router import CloudLoad, RouterConfig
from diffusionx.policy.service_model import ReplicaLoad
from diffusionx.policy.sessions import SessionTracker
from diffusionx.policy.speculation import preview_digest
from diffusionx.policy.tenants import Tenants
from diffusionx.requests import Img2ImgRequest, InvalidRequestError, PreviewRequest
from diffusionx.serving.errors import PreviewNotFound, RateLimited, TierOverloaded
from diffusionx.serving.guard import Guard, GuardConfig, load_api_keys, owner_of
from diffusionx.workflows import modes
from diffusionx.workflows.modes import GenerateRequest, Tiers

LOAD_REFRESH_S = 0.25  # how often admission control reads the tiers' reported load

logger = logging.getLogger(__name__)
# a PNG of at most this many pixels encodes in well under a millisecond (0.25 ms for the 32x32 previews
# measured on the 2-core CPU machine): inline it is cheaper than the thread hop (~1.4 ms there), larger
# images go to a worker thread so the event loop stays free
INLINE_PNG_PIXELS = 128 * 128

app = FastAPI(
    title="DiffusionX",
    version="0.1.0",
    description="Interactive text-to-image: edge previews, predicted-strength cloud refinement, EC-Diff. "
    "Errors answer `{error, status}`; 401 without a valid API key (when keys are on), 413 for a body over "
    "the byte limit, 422 for bad input, 404 for an unknown preview id, 429 with Retry-After for an API key "
    "over its rate, 503 with Retry-After on overload.",
)
add_web_page(app)  # GET /: the session page (deployments/static)

# The guard's settings of this replica: the app (and so the middleware) is built before the replica's
# constructor runs, which sets them from the application's args through `configure_guard`. Serve ships
# the ingress class by value (cloudpickle: `serve.ingress` makes a class no module names), so a `global`
# statement in its constructor would set a copy of this module's globals, not the one the middleware
# reads; module-level functions travel by reference, so both go through these two.
_guard_config = GuardConfig()


def guard_config() -> GuardConfig:
    return _guard_config


def configure_guard(config: GuardConfig) -> None:
    global _guard_config
    _guard_config = config


app.add_middleware(Guard, config=guard_config)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, status=status).model_dump(), status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    parts = []
    for item in error.errors():
        location = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return _error(422, "; ".join(parts))


@app.exception_handler(InvalidRequestError)
async def _invalid_request(_: Request, error: InvalidRequestError) -> JSONResponse:
    # raised in a tier replica it arrives wrapped (RayTaskError); answer with the original message
    cause = getattr(error, "cause", None)
    return _error(422, str(cause if isinstance(cause, InvalidRequestError) else error))


@app.exception_handler(PreviewNotFound)
async def _preview_not_found(_: Request, error: PreviewNotFound) -> JSONResponse:
    return _error(404, str(error))


@app.exception_handler(RateLimited)
async def _rate_limited(request: Request, error: RateLimited) -> JSONResponse:
    ingress_metrics().request_shed(request.url.path)
    return _error(429, str(error), headers={"Retry-After": str(error.retry_after_s)})


@app.exception_handler(TierOverloaded)
async def _overloaded(request: Request, error: TierOverloaded) -> JSONResponse:
    ingress_metrics().request_shed(request.url.path)
    return _error(503, f"overloaded, retry later: {error}", headers={"Retry-After": str(error.retry_after_s)})


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries of the error statuses a route answers, all with the API's error body."""
    what = {
        401: "Missing or wrong API key (only when the server has API keys).",
        404: "The preview_id is unknown, has expired, or belongs to another API key.",
        413: "The request body is larger than the server's byte limit.",
        422: "The request is not valid: the message names the field and what is allowed.",
        429: "The API key is over its rate: retry after the Retry-After header's seconds.",
        503: "Overloaded or a replica is restarting: retry after the Retry-After header's seconds.",
    }
    retry_after = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
    return {
        status: {
            "model": ErrorResponse,
            "description": what[status],
            **({"headers": retry_after} if status in (429, 503) else {}),
        }
        for status in statuses
    }


def _status_of(error: Exception) -> int:
    """The HTTP status of an error that ends an event stream (the exception handlers' mapping)."""
    if isinstance(error, InvalidRequestError):
        return 422
    if isinstance(error, PreviewNotFound):
        return 404
    if isinstance(error, RateLimited):
        return 429
    if isinstance(error, TierOverloaded):
        return 503
    return 500


def to_request(body: PreviewBody | GenerateBody) -> PreviewRequest:
    """The library's request for an HTTP body (unset fields: the model's or the mode's defaults): a
    text-to-image request for a preview, a GenerateRequest with the mode's parameters for a generate."""
    common = {
        "seed": body.seed,
        "width": body.width,
        "height": body.height,
        "num_inference_steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
    }
    if not isinstance(body, GenerateBody):
        return PreviewRequest(body.prompt, **common)
    mode_fields = ("switch_step", "warmup_steps", "approx_interval", "smoothing", "latency_target_ms")
    return GenerateRequest(body.prompt, **common, **{name: getattr(body, name) for name in mode_fields})


async def encode_png(image: Image.Image) -> bytes:
    if image.width * image.height <= INLINE_PNG_PIXELS:
        return imaging.encode_png(image)
    return await asyncio.to_thread(imaging.encode_png, image)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


def _s(start: float) -> float:
    return time.perf_counter() - start


@serve.deployment(
    name="DiffusionXIngress",
    ray_actor_options={"num_cpus": 0.1},
    # Admission control decides here, at once; Serve's own queue in front of the ingress must not fill
    # first (its 503 carries no Retry-After), so the ingress takes every request (a refusal is cheap).
    max_ongoing_requests=1024,
    max_queued_requests=-1,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 256},
)
@serve.ingress(app)
class DiffusionXIngress:
    def __init__(self, edge: Any, predictor: Any, cloud: Any, state: Any, args: dict | None = None) -> None:
        self.state = state
        self.args = AppArgs(**(args or {}))
        keys = load_api_keys(self.args.api_keys)
        configure_guard(GuardConfig(keys, self.args.max_body_bytes))
        # previews on their way to SharedState (only puts in flight): id -> (owner, png, task)
        self._storing: dict[str, tuple[str, bytes, asyncio.Task]] = {}
        self.tiers = Tiers(
            edge=EdgeHandle(edge),
            cloud=CloudHandle(cloud),
            predictor=PredictorHandle(predictor),
            cloud_load=self._cloud_load,
            router=RouterConfig(
                min_steps=self.args.router_min_steps, strength_floor=self.args.router_strength_floor
            ),
            default_latency_target_ms=self.args.default_latency_target_ms,
            latency_calibration=LatencyCalibration(),
            cloud_arrivals=ArrivalRate(),
            speculation=None
            if self.args.speculation == "off"
            else HandleSpeculation(cloud, state, self.args.speculation_policy()),
        )
        self.admission = AdmissionControl(
            {"edge": self.args.edge_max_batch_size, "cloud": self.args.cloud_max_batch_size},
            max_wait_s=self.args.admission_max_wait_s,
            tenants=Tenants((owner_of(key.key), key) for key in keys) if keys else None,
        )
        self._load_watcher: asyncio.Task | None = None
        # the cloud tier's leading indicator (diffusionx.policy.ahead), published with the load refresh
        self.sessions = SessionTracker()
        self._sessions_source = uuid.uuid4().hex
        self.metrics = ingress_metrics()
        self._metrics_url: str | None = None

    # -- helpers -----------------------------------------------------------------------------------------
    def _seen(self, endpoint: str, request: Request) -> None:
        self.metrics.request_seen(endpoint, request.headers.get(RETRY_HEADER))

    async def _resolve_image(self, image: str | None, preview_id: str | None, owner: str) -> Image.Image:
        return await asyncio.to_thread(imaging.decode_png, await self._resolve_png(image, preview_id, owner))

    async def _resolve_png(self, image: str | None, preview_id: str | None, owner: str) -> bytes:
        if image is not None:
            return await asyncio.to_thread(imaging.decode_base64, image)
        storing = self._storing.get(preview_id)
        if storing is not None and storing[0] == owner:
            png = storing[1]
        else:
            png = await ask(self.state.get_preview, preview_id, owner)
        if png is None:
            raise PreviewNotFound(
                f"preview_id '{preview_id}' is unknown or has expired (the server keeps a bounded cache); "
                "send the image itself instead"
            )
        return png

    def _store_preview(self, png: bytes, owner: str) -> str:
        """Puts a preview into the shared cache without holding its response for the round trip to
        SharedState (it was ~10 ms of the ~45 ms overhead at one client): until the put lands, this replica
        answers the id from `_storing`; another ingress replica asked within those milliseconds answers 404
        like after an eviction, and the client resends the image. The map holds only puts in flight."""
        preview_id = uuid.uuid4().hex
        task = asyncio.get_running_loop().create_task(ask(self.state.put_preview, png, preview_id, owner))
        self._storing[preview_id] = (owner, png, task)
        task.add_done_callback(lambda done: self._stored(preview_id, done))
        return preview_id

    def _stored(self, preview_id: str, task: asyncio.Task) -> None:
        self._storing.pop(preview_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("preview %s was not cached: %r", preview_id, task.exception())

    async def _speculate(self, body: PreviewBody, png: bytes, session: str) -> None:
        """Speculates the refinement of this preview (the workflow decides whether the policy allows)."""
        image = await asyncio.to_thread(imaging.decode_png, png)
        await modes.speculate(
            self.tiers,
            body.prompt,
            image,
            preview_digest(png),
            session=session,
            seed=body.seed,
            guidance_scale=body.guidance_scale,
        )

    async def _cloud_load(self) -> CloudLoad:
        tier = await ask(self.state.tier, "cloud")
        return CloudLoad(tuple(ReplicaLoad.from_snapshot(s) for s in tier.get("per_replica", ())))

    async def _watch_load(self) -> None:
        """Keeps admission control's view of the tiers fresh (one small call every LOAD_REFRESH_S)."""
        while True:
            try:
                self.admission.update(await self.state.tiers.remote())
                activity = self.sessions.activity().to_dict()
                await self.state.report_sessions.remote(self._sessions_source, activity)
            except Exception as error:  # the shared state restarting: the view ages out meanwhile
                logger.debug("tier load unavailable: %s", error)
            await asyncio.sleep(LOAD_REFRESH_S)

    async def _admit(self, needs: dict[str, int], owner: str) -> None:
        """Refuses the request at once (503 + Retry-After) when a tier it needs cannot start it in time,
        or its API key is over its share of it (or 429 + Retry-After: over the key's rate)."""
        if self._load_watcher is None or self._load_watcher.done():
            self._load_watcher = asyncio.get_running_loop().create_task(self._watch_load())
        refusal = self.admission.decide(needs, owner)
        if refusal is not None:
            error = RateLimited if refusal.status == 429 else TierOverloaded
            raise error(refusal.message, refusal.retry_after_s)

    async def _steps(self, tier: str, key: str, given: int | None) -> int:
        """A request's steps on `tier` (for admission control's count): as given, else the tier's default."""
        if given is not None:
            return given
        try:
            return int((await self.tiers.info(tier))[key])
        except (TierOverloaded, KeyError):
            return 1

    # -- routes --------------------------------------------------------------------------------------------
    @app.get("/v1/health", responses=_errors(503))
    async def health(self) -> dict:
        edge, cloud = await asyncio.gather(self.tiers.info("edge"), self.tiers.info("cloud"))
        return {"status": "ok", "edge": edge, "cloud": cloud}

    @app.get("/v1/stats", response_model=StatsResponse, responses=_errors(401, 503))
    async def stats(self) -> dict:
        if self._metrics_url is None:
            self._metrics_url = await asyncio.to_thread(metrics_url)
        return {**await ask(self.state.stats), "metrics_url": self._metrics_url}

    @app.post("/v1/preview", response_model=PreviewResponse, responses=_errors(401, 404, 413, 422, 429, 503))
    async def preview(self, body: PreviewBody, http_request: Request) -> Any:
        self._seen("/v1/preview", http_request)
        owner = http_request.state.owner
        if body.image is not None or body.preview_id is not None:
            steps = await self._steps("edge", "default_steps", body.num_inference_steps)
            # a strength the edit predictor has yet to pick is admitted at the most it can cost (1.0)
            needs = {"edge": int(steps * (1.0 if body.strength is None else body.strength))}
        else:
            needs = {"edge": await self._steps("edge", "preview_steps", body.num_inference_steps)}
        await self._admit(needs, owner)  # before a stream starts: a refusal is a plain 503
        if wants_events(http_request):
            return await event_stream(
                lambda on_progress: self._preview(body, owner, needs, on_progress),
                PreviewResponse,
                _status_of,
            )
        return await self._preview(body, owner, needs)

    async def _preview(
        self, body: PreviewBody, owner: str, needs: dict[str, int], on_progress: Any = None
    ) -> dict:
        start = time.perf_counter()
        predicted = None
        is_edit = body.image is not None or body.preview_id is not None
        with self.admission.admit(needs, owner):
            if is_edit:
                image = await self._resolve_image(body.image, body.preview_id, owner)
            if is_edit and body.strength is not None:
                edit_request = Img2ImgRequest(
                    body.prompt,
                    image,
                    body.strength,
                    seed=body.seed,
                    num_inference_steps=body.num_inference_steps,
                    guidance_scale=body.guidance_scale,
                )
                result = await modes.edit(self.tiers, edit_request, on_progress)
            elif is_edit:  # the edit predictor picks the strength
                result = await modes.edit_predicted(
                    self.tiers,
                    body.prompt,
                    image,
                    body.previous_prompt,
                    seed=body.seed,
                    num_inference_steps=body.num_inference_steps,
                    guidance_scale=body.guidance_scale,
                    on_progress=on_progress,
                )
                predicted = result.strength
            else:
                result = await modes.preview(self.tiers, to_request(body), on_progress)
        png = await encode_png(result.image)
        preview_id = self._store_preview(png, owner)
        if self.tiers.speculation is not None:  # after the answer, off its path
            self.tiers.speculation.later(self._speculate(body, png, body.session_id or preview_id))
        self.sessions.preview(preview_id, body.preview_id)
        self.metrics.request_done("preview", "edit" if is_edit else "edge", _s(start))
        return {
            "preview_id": preview_id,
            "image": base64.b64encode(png).decode("ascii"),
            "seed": result.seed,
            "width": result.image.width,
            "height": result.image.height,
            "num_inference_steps": result.num_inference_steps,
            "strength": result.strength,
            "strength_predicted": predicted,
            "unet_calls": result.unet_calls.to_dict(),
            "timings_ms": {**result.timings_ms, "server_total": _ms(start)},
        }

    @app.post("/v1/refine", response_model=RefineResponse, responses=_errors(401, 404, 413, 422, 429, 503))
    async def refine(self, body: RefineBody, http_request: Request) -> Any:
        self._seen("/v1/refine", http_request)
        owner = http_request.state.owner
        strength = body.strength if body.strength is not None else 1.0
        target = body.latency_target_ms or self.args.default_latency_target_ms
        if target is None:
            steps = await self._steps("cloud", "default_steps", body.num_inference_steps)
            needs = {"cloud": max(1, int(steps * strength))}
        else:  # the router fits the cloud work to the target or falls back to the edge: refuse at the
            # door only when the edge fallback could not start either
            steps = await self._steps("edge", "default_steps", None)
            needs = {"edge": max(1, int(steps * strength))}
        await self._admit(needs, owner)  # before a stream starts: a refusal is a plain 503
        if wants_events(http_request):
            return await event_stream(
                lambda on_progress: self._refine(body, owner, needs, on_progress), RefineResponse, _status_of
            )
        return await self._refine(body, owner, needs)

    async def _refine(
        self, body: RefineBody, owner: str, needs: dict[str, int], on_progress: Any = None
    ) -> dict:
        start = time.perf_counter()
        with self.admission.admit(needs, owner):
            png = await self._resolve_png(body.image, body.preview_id, owner)
            image = await asyncio.to_thread(imaging.decode_png, png)
            final = await modes.finalize(
                self.tiers,
                body.prompt,
                image,
                seed=body.seed,
                guidance_scale=body.guidance_scale,
                strength=body.strength,
                num_inference_steps=body.num_inference_steps,
                latency_target_ms=body.latency_target_ms,
                on_progress=on_progress,
                preview=preview_digest(png) if body.speculation == "on" else None,
            )
        result, decision = final.result, final.decision
        self.sessions.finalize(
            body.preview_id, decision.cloud_steps if decision.route != "edge-fallback" else 0
        )
        image = base64.b64encode(await encode_png(result.image)).decode("ascii")
        self.metrics.routed(decision.route, final.strength_predicted, decision.strength)
        self.metrics.request_done("refine", decision.route, _s(start))
        # the latency of a refinement the router predicted teaches its calibration (not an edge fallback's,
        # nor one a speculation answered)
        if decision.route != "edge-fallback" and final.speculative not in ("hit", "promoted"):
            self.tiers.latency_calibration.observe(decision.uncorrected_latency_ms, _ms(start))
        return {
            "image": image,
            "seed": result.seed,
            "strength_predicted": final.strength_predicted,
            "strength_used": decision.strength,
            "num_inference_steps": decision.num_inference_steps,
            "route": decision.route,
            "reason": decision.reason,
            "load": {**final.load.to_dict(decision.cloud_steps), "latency_scale": decision.latency_scale},
            "expected_latency_ms": decision.expected_latency_ms,
            "unet_calls": result.unet_calls.to_dict(),
            "timings_ms": {**final.timings_ms, "server_total": _ms(start)},
            "speculative": final.speculative,
        }

    @app.post("/v1/generate", response_model=GenerateResponse, responses=_errors(401, 413, 422, 429, 503))
    async def generate(self, body: GenerateBody, http_request: Request) -> dict:
        start = time.perf_counter()
        self._seen("/v1/generate", http_request)
        needs = {}
        if body.mode != "cloud":
            needs["edge"] = await self._steps("edge", "default_steps", body.num_inference_steps)
        if body.mode != "edge":
            needs["cloud"] = await self._steps("cloud", "default_steps", body.num_inference_steps)
        owner = http_request.state.owner
        await self._admit(needs, owner)
        with self.admission.admit(needs, owner):
            generated = await modes.generate(self.tiers, body.mode, to_request(body))
        result = generated.result
        image = base64.b64encode(await encode_png(result.image)).decode("ascii")
        self.metrics.request_done("generate", body.mode, _s(start))
        return {
            "image": image,
            "mode": body.mode,
            "seed": result.seed,
            "num_inference_steps": result.num_inference_steps,
            "unet_calls": result.unet_calls.to_dict(),
            "timings_ms": {**result.timings_ms, "server_total": _ms(start)},
            "parameters": generated.parameters,
        }
