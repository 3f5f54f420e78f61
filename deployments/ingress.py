"""DiffusionXIngress: the HTTP API. (No `from __future__ import annotations` here: FastAPI must see real
body types on the route methods.) HTTP concerns only: schemas, PNG work off the event loop, and errors
(bad input -> 4xx with the reason, unknown preview id -> 404, overload -> 503 with Retry-After). What a
request does is the library's workflow (`diffusionx.workflows.modes`), handed tiers that call the tier
deployments through their DeploymentHandles."""

import asyncio
import base64
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from ray.serve.exceptions import BackPressureError

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
from diffusionx.policy.router import CloudLoad, RouterConfig
from diffusionx.policy.service_model import ReplicaLoad
from diffusionx.requests import GenerationResult, Img2ImgRequest, InvalidRequestError, PreviewRequest
from diffusionx.workflows import modes
from diffusionx.workflows.modes import GenerateRequest, Tiers

RETRY_AFTER_S = 1

app = FastAPI(
    title="DiffusionX",
    version="0.1.0",
    description="Interactive text-to-image: edge previews, predicted-strength cloud refinement, EC-Diff.",
)


class PreviewNotFound(LookupError):
    pass


class TierOverloaded(RuntimeError):
    """A tier's queue is full (its max_queued_requests): answered as 503 with Retry-After."""


async def ask(method: Any, *args: Any) -> Any:
    """Calls a tier through its DeploymentHandle method; a full queue becomes TierOverloaded (Serve would
    otherwise answer a bare 503 without Retry-After)."""
    try:
        return await method.remote(*args)
    except BackPressureError as error:
        raise TierOverloaded(str(error)) from None


class _HandleTier:
    """A tier deployment as the workflows call it: every method awaits the handle's method."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def info(self) -> dict:
        return await ask(self.handle.info)


class EdgeHandle(_HandleTier):
    async def preview(self, request: PreviewRequest) -> GenerationResult:
        return await ask(self.handle.preview, request)

    async def edit(self, request: Img2ImgRequest) -> GenerationResult:
        return await ask(self.handle.edit, request)

    async def finish(self, state: Any) -> GenerationResult:
        # `state` may be the cloud's unresolved DeploymentResponse: Serve resolves it for the edge replica,
        # so the latents go from the cloud replica to the edge replica without passing through here
        return await ask(self.handle.finish, state)


class CloudHandle(_HandleTier):
    async def refine(self, request: Img2ImgRequest) -> GenerationResult:
        return await ask(self.handle.refine, request)

    async def generate(self, request: PreviewRequest) -> GenerationResult:
        return await ask(self.handle.generate, request)

    def plan(self, request: Any) -> Any:
        return self.handle.plan.remote(request)  # not awaited: handed to the edge tier as it is


class PredictorHandle(_HandleTier):
    async def predict(self, prompt: str, image: Image.Image) -> float:
        return await ask(self.handle.predict, prompt, image)


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


@app.exception_handler(TierOverloaded)
async def _overloaded(_: Request, error: TierOverloaded) -> JSONResponse:
    return _error(503, f"overloaded, retry later: {error}", headers={"Retry-After": str(RETRY_AFTER_S)})


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


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


@serve.deployment(
    name="DiffusionXIngress",
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=64,
    max_queued_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
)
@serve.ingress(app)
class DiffusionXIngress:
    def __init__(self, edge: Any, predictor: Any, cloud: Any, state: Any, args: dict | None = None) -> None:
        self.state = state
        self.args = AppArgs(**(args or {}))
        self.tiers = Tiers(
            edge=EdgeHandle(edge),
            cloud=CloudHandle(cloud),
            predictor=PredictorHandle(predictor),
            cloud_load=self._cloud_load,
            router=RouterConfig(
                min_steps=self.args.router_min_steps, strength_floor=self.args.router_strength_floor
            ),
            default_latency_target_ms=self.args.default_latency_target_ms,
        )

    # -- helpers -----------------------------------------------------------------------------------------
    async def _resolve_image(self, image: str | None, preview_id: str | None) -> Image.Image:
        if image is not None:
            return await asyncio.to_thread(imaging.decode_png_base64, image)
        png = await ask(self.state.get_preview, preview_id)
        if png is None:
            raise PreviewNotFound(
                f"preview_id '{preview_id}' is unknown or has expired (the server keeps a bounded cache); "
                "send the image itself instead"
            )
        return await asyncio.to_thread(imaging.decode_png, png)

    async def _cloud_load(self) -> CloudLoad:
        tier = await ask(self.state.tier, "cloud")
        return CloudLoad(tuple(ReplicaLoad.from_snapshot(s) for s in tier.get("per_replica", ())))

    # -- routes --------------------------------------------------------------------------------------------
    @app.get("/v1/health")
    async def health(self) -> dict:
        edge, cloud = await asyncio.gather(self.tiers.info("edge"), self.tiers.info("cloud"))
        return {"status": "ok", "edge": edge, "cloud": cloud}

    @app.get("/v1/stats", response_model=StatsResponse)
    async def stats(self) -> dict:
        return await ask(self.state.stats)

    @app.post("/v1/preview", response_model=PreviewResponse, responses={422: {"model": ErrorResponse}})
    async def preview(self, body: PreviewBody) -> dict:
        start = time.perf_counter()
        if body.strength is not None:
            image = await self._resolve_image(body.image, body.preview_id)
            request = Img2ImgRequest(
                body.prompt,
                image,
                body.strength,
                seed=body.seed,
                num_inference_steps=body.num_inference_steps,
                guidance_scale=body.guidance_scale,
            )
            result = await modes.edit(self.tiers, request)
        else:
            result = await modes.preview(self.tiers, to_request(body))
        png = await asyncio.to_thread(imaging.encode_png, result.image)
        preview_id = await ask(self.state.put_preview, png)
        return {
            "preview_id": preview_id,
            "image": base64.b64encode(png).decode("ascii"),
            "seed": result.seed,
            "width": result.image.width,
            "height": result.image.height,
            "num_inference_steps": result.num_inference_steps,
            "strength": result.strength,
            "unet_calls": result.unet_calls.to_dict(),
            "timings_ms": {**result.timings_ms, "server_total": _ms(start)},
        }

    @app.post("/v1/refine", response_model=RefineResponse, responses={404: {"model": ErrorResponse}})
    async def refine(self, body: RefineBody) -> dict:
        start = time.perf_counter()
        image = await self._resolve_image(body.image, body.preview_id)
        final = await modes.finalize(
            self.tiers,
            body.prompt,
            image,
            seed=body.seed,
            guidance_scale=body.guidance_scale,
            strength=body.strength,
            num_inference_steps=body.num_inference_steps,
            latency_target_ms=body.latency_target_ms,
        )
        result, decision = final.result, final.decision
        return {
            "image": await asyncio.to_thread(imaging.encode_png_base64, result.image),
            "seed": result.seed,
            "strength_predicted": final.strength_predicted,
            "strength_used": decision.strength,
            "num_inference_steps": decision.num_inference_steps,
            "route": decision.route,
            "reason": decision.reason,
            "load": final.load.to_dict(decision.cloud_steps),
            "expected_latency_ms": decision.expected_latency_ms,
            "unet_calls": result.unet_calls.to_dict(),
            "timings_ms": {**final.timings_ms, "server_total": _ms(start)},
        }

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateBody) -> dict:
        start = time.perf_counter()
        generated = await modes.generate(self.tiers, body.mode, to_request(body))
        result = generated.result
        return {
            "image": await asyncio.to_thread(imaging.encode_png_base64, result.image),
            "mode": body.mode,
            "seed": result.seed,
            "num_inference_steps": result.num_inference_steps,
            "unet_calls": result.unet_calls.to_dict(),
            "timings_ms": {**result.timings_ms, "server_total": _ms(start)},
            "parameters": generated.parameters,
        }
