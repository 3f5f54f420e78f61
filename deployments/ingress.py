"""DiffusionXIngress: the HTTP API. (No `from __future__ import annotations` here: FastAPI must see real
body types on the route methods.) HTTP concerns only: schemas in, errors out (bad input -> 4xx with the
reason, unknown preview id -> 404, overload -> 503 with Retry-After), and streaming. What a request costs,
which workflow it runs and what it answers is the library's `diffusionx.serving.frontend.Frontend`,
handed tiers that call the tier deployments through their DeploymentHandles (`deployments.handles`).
Preview and refine stream their progress as server-sent events when asked (`deployments.sse`); the web
page at `/` is `deployments.web`; metrics are `deployments.metrics`.

Reliability (DESIGN.md, "Reliability contract"): the guard (`diffusionx.serving.guard`) refuses bad bodies
and keys before a route runs; admission control (`diffusionx.policy.admission`) refuses work at once when
the tier it needs cannot start it within `admission_max_wait_s`; a tier call whose replica died is retried
once, and an EC-Diff plan lost with its cloud replica is planned again (`deployments.handles`); a key over
its rate gets 429 (tenants). Speculation (`speculation: idle`) runs over `deployments.speculation`."""

import asyncio
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from deployments.handles import CloudHandle, EdgeHandle, PredictorHandle, ask
from deployments.metrics import RETRY_HEADER, ingress_metrics, metrics_url
from deployments.speculation import HandleSpeculation
from deployments.sse import event_stream, wants_events
from deployments.web import add_web_page
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
from diffusionx.policy.load import TierLoad
from diffusionx.policy.router import CloudLoad, RouterConfig
from diffusionx.policy.sessions import SessionTracker
from diffusionx.policy.tenants import Tenants
from diffusionx.requests import InvalidRequestError
from diffusionx.serving.errors import PreviewNotFound, RateLimited, TierOverloaded, status_of
from diffusionx.serving.frontend import Frontend
from diffusionx.serving.guard import Guard, GuardConfig, load_api_keys, owner_of
from diffusionx.serving.load_view import LoadView, cloud_load
from diffusionx.serving.preview_store import PreviewStore
from diffusionx.workflows.modes import Tiers

app = FastAPI(
    title="DiffusionX",
    version="0.1.0",
    description="Interactive text-to-image: edge previews, predicted-strength cloud refinement, EC-Diff. "
    "Errors answer `{error, status}`; 401 without a valid API key (when keys are on), 413 for a body over "
    "the byte limit, 422 for bad input, 404 for an unknown preview id, 429 with Retry-After for an API key "
    "over its rate, 503 with Retry-After on overload.",
)
add_web_page(app)  # GET /: the session page (deployments/static)


# The guard's settings of this replica, set by its constructor from the application's args. Serve ships the
# ingress class (and the app with its middleware) by value, so an object the middleware holds would be a
# copy; module-level functions travel by reference, so the middleware and the constructor both go through
# these two and meet in this module's globals.
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


# Admission control decides here, at once; Serve's own queue in front of the ingress must not fill first
# (its 503 carries no Retry-After), so every serve config lets the ingress take every request.
@serve.deployment(name="DiffusionXIngress")
@serve.ingress(app)
class DiffusionXIngress:
    def __init__(self, edge: Any, predictor: Any, cloud: Any, state: Any, args: dict | None = None) -> None:
        self.state = state  # the SharedState deployment's handle
        self.args = AppArgs(**(args or {}))
        keys = load_api_keys(self.args.api_keys)
        configure_guard(GuardConfig(keys, self.args.max_body_bytes))
        speculation = self.args.speculation_policy()
        admission = AdmissionControl(
            {"edge": self.args.edge_max_batch_size, "cloud": self.args.cloud_max_batch_size},
            max_wait_s=self.args.admission_max_wait_s,
            tenants=Tenants((owner_of(key.key), key) for key in keys) if keys else None,
        )
        tiers = Tiers(
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
            if speculation.mode == "off"
            else HandleSpeculation(
                cloud, state, speculation, hold=admission.holding, room=admission.background_room
            ),
        )
        self.metrics = ingress_metrics()
        self.sessions = SessionTracker()  # the cloud's leading indicator (policy.ahead), sent with each load
        self._sessions_source = uuid.uuid4().hex
        previews = PreviewStore(self._put_preview, self._get_preview)
        self.frontend = Frontend(tiers, admission, previews, self.metrics, self.sessions)
        self.load_view = LoadView(admission, self._tier_loads, publish=self._publish_sessions)
        self._metrics_url: str | None = None

    async def _put_preview(self, png: bytes, preview_id: str, owner: str) -> object:
        return await ask(self.state.put_preview, png, preview_id, owner)

    async def _get_preview(self, preview_id: str, owner: str) -> bytes | None:
        png: bytes | None = await ask(self.state.get_preview, preview_id, owner)
        return png

    async def _tier_loads(self) -> dict[str, TierLoad]:
        loads: dict[str, TierLoad] = await self.state.tiers.remote()
        return loads

    async def _publish_sessions(self) -> None:
        await self.state.report_sessions.remote(self._sessions_source, self.sessions.activity().to_dict())

    async def _cloud_load(self) -> CloudLoad:
        return cloud_load(await ask(self.state.tier, "cloud"))

    def _seen(self, endpoint: str, request: Request) -> None:
        self.metrics.request_seen(endpoint, request.headers.get(RETRY_HEADER))
        self.load_view.ensure_polling()

    @app.get("/v1/health", responses=_errors(503))
    async def health(self) -> dict:
        tiers = self.frontend.tiers
        edge, cloud = await asyncio.gather(tiers.info("edge"), tiers.info("cloud"))
        return {"status": "ok", "edge": edge, "cloud": cloud}

    @app.get("/v1/stats", response_model=StatsResponse, responses=_errors(401, 503))
    async def stats(self) -> dict:
        if self._metrics_url is None:
            self._metrics_url = await asyncio.to_thread(metrics_url)
        return {**await ask(self.state.stats), "metrics_url": self._metrics_url}

    @app.post("/v1/preview", response_model=PreviewResponse, responses=_errors(401, 404, 413, 422, 429, 503))
    async def preview(self, body: PreviewBody, http_request: Request) -> PreviewResponse | StreamingResponse:
        self._seen("/v1/preview", http_request)
        owner = http_request.state.owner
        needs = await self.frontend.preview_needs(body)
        self.frontend.admit(needs, owner)  # before a stream starts: a refusal is a plain 503 (or 429)
        if wants_events(http_request):
            return await event_stream(
                lambda on_progress: self.frontend.preview(body, owner, needs, on_progress),
                PreviewResponse,
                status_of,
            )
        return await self.frontend.preview(body, owner, needs)

    @app.post("/v1/refine", response_model=RefineResponse, responses=_errors(401, 404, 413, 422, 429, 503))
    async def refine(self, body: RefineBody, http_request: Request) -> RefineResponse | StreamingResponse:
        self._seen("/v1/refine", http_request)
        owner = http_request.state.owner
        needs = await self.frontend.refine_needs(body)
        self.frontend.admit(needs, owner)  # before a stream starts: a refusal is a plain 503 (or 429)
        if wants_events(http_request):
            return await event_stream(
                lambda on_progress: self.frontend.refine(body, owner, needs, on_progress),
                RefineResponse,
                status_of,
            )
        return await self.frontend.refine(body, owner, needs)

    @app.post("/v1/generate", response_model=GenerateResponse, responses=_errors(401, 413, 422, 429, 503))
    async def generate(self, body: GenerateBody, http_request: Request) -> GenerateResponse:
        self._seen("/v1/generate", http_request)
        owner = http_request.state.owner
        needs = await self.frontend.generate_needs(body)
        self.frontend.admit(needs, owner)
        return await self.frontend.generate(body, owner, needs)
