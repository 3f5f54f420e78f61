"""Typed results of the HTTP API, with images decoded to PIL.

Field names follow the server's JSON (see `diffusionx.api`); `latency_ms` is added by the client: the
end-to-end time of the HTTP exchange as the client saw it. Images go through the project's one codec,
`diffusionx.imaging`, which imports Pillow only (importing `diffusionx` loads nothing heavy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from clients.errors import DiffusionXError
from diffusionx.imaging import decode_png_base64, encode_png_base64
from diffusionx.requests import InvalidRequestError


def encode_image(image: Image.Image | str) -> str:
    """A PIL image as base64 PNG; a string is taken to be base64 already and passed through."""
    if isinstance(image, str):
        return image
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a base64 PNG string, got {type(image).__name__}")
    return encode_png_base64(image)


def decode_image(data: Any, field_name: str = "image") -> Image.Image:
    """The server's base64 PNG as an RGB PIL image; a DiffusionXError if it does not decode."""
    try:
        return decode_png_base64(data, field_name)
    except InvalidRequestError as error:
        raise DiffusionXError(f"server response: {error}") from None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _require(payload: dict[str, Any], kind: str, *names: str) -> None:
    missing = [name for name in names if name not in payload]
    if missing:
        raise DiffusionXError(f"{kind} response lacks {', '.join(missing)}; got keys {sorted(payload)}")


@dataclass
class PreviewResult:
    """One preview (or edit) from the edge tier."""

    preview_id: str
    image: Image.Image
    seed: int
    width: int
    height: int
    num_inference_steps: int
    strength: float | None  # edit strength; None for a text-to-image preview
    unet_calls: dict[str, int]
    timings_ms: dict[str, float]
    latency_ms: float = 0.0
    image_base64: str = field(default="", repr=False)  # exactly what the server sent, for resending

    @classmethod
    def from_json(cls, payload: dict[str, Any], latency_ms: float = 0.0) -> PreviewResult:
        _require(payload, "preview", "preview_id", "image", "seed", "unet_calls", "timings_ms")
        image = decode_image(payload["image"])
        return cls(
            preview_id=str(payload["preview_id"]),
            image=image,
            seed=int(payload["seed"]),
            width=int(payload.get("width", image.width)),
            height=int(payload.get("height", image.height)),
            num_inference_steps=int(payload.get("num_inference_steps", 0)),
            strength=payload.get("strength"),
            unet_calls=dict(payload["unet_calls"]),
            timings_ms=dict(payload["timings_ms"]),
            latency_ms=latency_ms,
            image_base64=payload["image"],
        )


@dataclass
class RefineResult:
    """A finalized image: the cloud tier's refinement of a preview (or the router's fallback)."""

    image: Image.Image
    seed: int
    strength_predicted: float | None  # None when the request gave the strength (nothing was predicted)
    strength_used: float
    num_inference_steps: int
    route: str  # "cloud" | "cloud-reduced" | "edge-fallback"
    reason: str
    load: dict[str, float]
    unet_calls: dict[str, int]
    timings_ms: dict[str, float]
    latency_ms: float = 0.0
    expected_latency_ms: float | None = None  # the router's prediction (None: not measured yet)
    speculative: str = "off"  # hit | promoted | miss: how the server's speculation served it; off: not used

    @classmethod
    def from_json(cls, payload: dict[str, Any], latency_ms: float = 0.0) -> RefineResult:
        _require(payload, "refine", "image", "strength_predicted", "strength_used", "route", "unet_calls")
        return cls(
            image=decode_image(payload["image"]),
            seed=int(payload.get("seed", 0)),
            strength_predicted=_optional_float(payload["strength_predicted"]),
            strength_used=float(payload["strength_used"]),
            num_inference_steps=int(payload.get("num_inference_steps", 0)),
            route=str(payload["route"]),
            reason=str(payload.get("reason", "")),
            load=dict(payload.get("load", {})),
            unet_calls=dict(payload["unet_calls"]),
            timings_ms=dict(payload.get("timings_ms", {})),
            latency_ms=latency_ms,
            expected_latency_ms=payload.get("expected_latency_ms"),
            speculative=str(payload.get("speculative", "off")),
        )


@dataclass
class GenerateResult:
    """One-shot text-to-image in a collaboration mode."""

    image: Image.Image
    mode: str
    seed: int
    num_inference_steps: int
    unet_calls: dict[str, int]
    timings_ms: dict[str, float]
    parameters: dict[str, Any] = field(default_factory=dict)
    latency_ms: float = 0.0

    @classmethod
    def from_json(cls, payload: dict[str, Any], latency_ms: float = 0.0) -> GenerateResult:
        _require(payload, "generate", "image", "mode", "unet_calls")
        return cls(
            image=decode_image(payload["image"]),
            mode=str(payload["mode"]),
            seed=int(payload.get("seed", 0)),
            num_inference_steps=int(payload.get("num_inference_steps", 0)),
            unet_calls=dict(payload["unet_calls"]),
            timings_ms=dict(payload.get("timings_ms", {})),
            parameters=dict(payload.get("parameters", {})),
            latency_ms=latency_ms,
        )


@dataclass
class TierStats:
    """Load of one tier (`edge`, `predictor`, `cloud`) as GET /v1/stats reports it."""

    queued: int = 0
    in_flight: int = 0
    queued_steps: int = 0
    replicas: int = 0
    recent_batch_sizes: list[int] = field(default_factory=list)
    seconds_per_step: float | None = None
    requests_served: int = 0

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> TierStats:
        return cls(
            queued=int(payload.get("queued", 0)),
            in_flight=int(payload.get("in_flight", 0)),
            queued_steps=int(payload.get("queued_steps", 0)),
            replicas=int(payload.get("replicas", 0)),
            recent_batch_sizes=[int(n) for n in payload.get("recent_batch_sizes", [])],
            seconds_per_step=payload.get("seconds_per_step"),
            requests_served=int(payload.get("requests_served", 0)),
        )


@dataclass
class StatsResult:
    """GET /v1/stats: per-tier load and the preview cache's counters."""

    tiers: dict[str, TierStats]
    preview_cache: dict[str, int] = field(default_factory=dict)
    metrics_url: str | None = None  # where Prometheus scrapes the server's metrics
    speculation: dict[str, Any] = field(default_factory=dict)  # results, unet_calls (used, wasted), held
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, payload: dict[str, Any], latency_ms: float = 0.0) -> StatsResult:
        _require(payload, "stats", "tiers")
        tiers = {name: TierStats.from_json(tier) for name, tier in payload["tiers"].items()}
        return cls(
            tiers=tiers,
            preview_cache=dict(payload.get("preview_cache", {})),
            metrics_url=payload.get("metrics_url"),
            speculation=dict(payload.get("speculation", {})),
            raw=payload,
        )


@dataclass(frozen=True)
class ProgressEvent:
    """One denoising step of a streamed preview or refine (`on_progress`)."""

    step: int  # 1-based
    total_steps: int
    tier: str  # edge | cloud
    elapsed_ms: float  # since the server took the request

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 1.0

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ProgressEvent:
        _require(payload, "progress event", "step", "total_steps", "tier", "elapsed_ms")
        return cls(
            int(payload["step"]),
            int(payload["total_steps"]),
            str(payload["tier"]),
            float(payload["elapsed_ms"]),
        )


@dataclass
class HealthResult:
    """GET /v1/health answered 2xx. `details` is the server's JSON body (empty if it sent none)."""

    ok: bool
    details: dict[str, Any] = field(default_factory=dict)
    latency_ms: float = 0.0

    @classmethod
    def from_json(cls, payload: Any, latency_ms: float = 0.0) -> HealthResult:
        details = payload if isinstance(payload, dict) else {"body": payload}
        status = str(details.get("status", "ok")).lower()
        return cls(ok=status in ("ok", "healthy", "ready"), details=details, latency_ms=latency_ms)
