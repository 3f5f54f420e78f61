"""DiffusionXIngress: the HTTP API. (No `from __future__ import annotations` here: FastAPI must see real
body types on the route methods.) Validates, composes the tiers through DeploymentHandles, and maps
errors: bad input -> 4xx with the reason, unknown preview id -> 404, overload -> 503 with Retry-After."""

import asyncio
import base64
import io
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from ray.serve.exceptions import BackPressureError

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
from diffusionx.collaborative import CollaborationParams, CollaborativeRequest
from diffusionx.imaging import decode_png_base64, encode_png_base64
from diffusionx.requests import (
    GenerationResult,
    Img2ImgRequest,
    InvalidRequestError,
    PreviewRequest,
    UnetCalls,
)
from diffusionx.router import CloudLoad, RouterConfig, decide_route
from diffusionx.service_model import ReplicaLoad

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


def to_text_request(body: PreviewBody | GenerateBody) -> PreviewRequest:
    """The library's text-to-image request for an HTTP body (unset fields: the model's defaults)."""
    return PreviewRequest(
        body.prompt,
        seed=body.seed,
        width=body.width,
        height=body.height,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
    )


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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
        self.edge, self.predictor, self.cloud, self.state = edge, predictor, cloud, state
        self.args = AppArgs(**(args or {}))
        self._cloud_info: dict | None = None  # the cloud tier's model facts; fixed for a deployment
        self.router_config = RouterConfig(
            min_steps=self.args.router_min_steps, strength_floor=self.args.router_strength_floor
        )

    # -- helpers -----------------------------------------------------------------------------------------
    async def _resolve_image(self, image: str | None, preview_id: str | None) -> Image.Image:
        if image is not None:
            return decode_png_base64(image)
        png = await ask(self.state.get_preview, preview_id)
        if png is None:
            raise PreviewNotFound(
                f"preview_id '{preview_id}' is unknown or has expired (the server keeps a bounded cache); "
                "send the image itself instead"
            )
        return Image.open(io.BytesIO(png)).convert("RGB")

    async def _cloud_default_steps(self) -> int:
        if self._cloud_info is None:
            self._cloud_info = await ask(self.cloud.info)
        return int(self._cloud_info["default_steps"])

    async def _cloud_load(self) -> CloudLoad:
        tier = await ask(self.state.tier, "cloud")
        return CloudLoad(tuple(ReplicaLoad.from_snapshot(s) for s in tier.get("per_replica", ())))

    async def _finalize(
        self,
        prompt: str,
        image: Image.Image,
        seed: int,
        guidance_scale: float | None,
        strength: float | None,
        num_inference_steps: int | None,
        latency_target_ms: float | None,
    ) -> dict:
        """Predict strength, route against the cloud load, refine: the DiffusionX finalize step."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        strength_predicted, load = await asyncio.gather(
            ask(self.predictor.predict, prompt, image), self._cloud_load()
        )
        timings["predict"] = _ms(start)
        steps = num_inference_steps or await self._cloud_default_steps()
        target = latency_target_ms if latency_target_ms is not None else self.args.default_latency_target_ms
        decision = decide_route(
            strength if strength is not None else strength_predicted, steps, load, target, self.router_config
        )
        request = Img2ImgRequest(
            prompt,
            image,
            decision.strength,
            seed=seed,
            num_inference_steps=decision.num_inference_steps,
            guidance_scale=guidance_scale,
        )
        tier = self.edge.edit if decision.route == "edge-fallback" else self.cloud.refine
        result: GenerationResult = await ask(tier, request)
        timings.update(result.timings_ms)
        return {
            "result": result,
            "strength_predicted": float(strength_predicted),
            "decision": decision,
            "load": load.to_dict(),
            "timings_ms": timings,
        }

    # -- routes --------------------------------------------------------------------------------------------
    @app.get("/v1/health")
    async def health(self) -> dict:
        edge, cloud = await asyncio.gather(ask(self.edge.info), ask(self.cloud.info))
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
            result: GenerationResult = await ask(self.edge.edit, request)
        else:
            result = await ask(self.edge.preview, to_text_request(body))
        png = _png_bytes(result.image)
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
        out = await self._finalize(
            body.prompt,
            image,
            body.seed,
            body.guidance_scale,
            body.strength,
            body.num_inference_steps,
            body.latency_target_ms,
        )
        result, decision = out["result"], out["decision"]
        return {
            "image": encode_png_base64(result.image),
            "seed": result.seed,
            "strength_predicted": out["strength_predicted"],
            "strength_used": decision.strength,
            "num_inference_steps": decision.num_inference_steps,
            "route": decision.route,
            "reason": decision.reason,
            "load": out["load"],
            "expected_latency_ms": decision.expected_latency_ms,
            "unet_calls": result.unet_calls.to_dict(),
            "timings_ms": {**out["timings_ms"], "server_total": _ms(start)},
        }

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateBody) -> dict:
        start = time.perf_counter()
        text_request = to_text_request(body)
        parameters: dict[str, Any] = {}
        if body.mode == "cloud":
            result: GenerationResult = await ask(self.cloud.generate, text_request)
            calls, timings = result.unet_calls, dict(result.timings_ms)
        elif body.mode == "edge":
            edge_info = await ask(self.edge.info)
            if text_request.num_inference_steps is None:
                text_request.num_inference_steps = edge_info["preview_steps"]
            result = await ask(self.edge.preview, text_request)
            calls, timings = result.unet_calls, dict(result.timings_ms)
        elif body.mode == "diffusionx":
            # the full schedule of the refinement is the request's steps; the preview uses edge defaults
            text_request.num_inference_steps = None
            preview: GenerationResult = await ask(self.edge.preview, text_request)
            out = await self._finalize(
                body.prompt,
                preview.image,
                body.seed,
                body.guidance_scale,
                None,
                body.num_inference_steps,
                body.latency_target_ms,
            )
            result, decision = out["result"], out["decision"]
            calls = preview.unet_calls + result.unet_calls
            timings = {**{f"preview_{k}": v for k, v in preview.timings_ms.items()}, **out["timings_ms"]}
            parameters = {
                "route": decision.route,
                "strength_predicted": out["strength_predicted"],
                "strength_used": decision.strength,
                "expected_latency_ms": decision.expected_latency_ms,
            }
        else:
            result, calls, timings, parameters = await self._collaborative(body, text_request)
        return {
            "image": encode_png_base64(result.image),
            "mode": body.mode,
            "seed": result.seed,
            "num_inference_steps": result.num_inference_steps,
            "unet_calls": UnetCalls(**calls.to_dict()).to_dict(),
            "timings_ms": {**timings, "server_total": _ms(start)},
            "parameters": parameters,
        }

    async def _collaborative(self, body: GenerateBody, text_request: PreviewRequest) -> tuple:
        """hybrid / ec-diff: the cloud tier plans steps 0..s-1, the latents travel to the edge tier, which
        runs s..N-1 and decodes. Each tier batches its part with other requests."""
        steps = body.num_inference_steps or await self._cloud_default_steps()
        if body.mode == "hybrid":
            params = CollaborationParams.hybrid(
                steps, switch_step=body.switch_step, guidance_scale=body.guidance_scale
            )
        else:
            params = CollaborationParams.ec_diff(
                steps,
                switch_step=body.switch_step,
                warmup_steps=body.warmup_steps,
                approx_interval=body.approx_interval,
                smoothing=body.smoothing,
                guidance_scale=body.guidance_scale,
            )
        request = CollaborativeRequest(
            body.prompt, seed=body.seed, width=body.width, height=body.height, params=params
        )
        state = await ask(self.cloud.plan, request)
        result: GenerationResult = await ask(self.edge.finish, state)
        parameters = {
            "switch_step": state.params.switch_step,
            "warmup_steps": state.params.warmup_steps,
            "approx_interval": state.params.approx_interval if state.params.approximates else None,
            "smoothing": state.params.smoothing if state.params.approximates else None,
        }
        return result, result.unet_calls, dict(result.timings_ms), parameters
