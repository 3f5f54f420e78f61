"""HTTP API schemas (pydantic). Field names are fixed by the design so clients, tests and tools agree.

Limits are the library's (`diffusionx.requests`); a violated limit becomes a 4xx whose message names the
field, the value and what is allowed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffusionx.requests import (
    MAX_GUIDANCE_SCALE,
    MAX_IMAGE_SIDE,
    MAX_INFERENCE_STEPS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MIN_IMAGE_SIDE,
    Mode,
    Route,
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the image should show.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the initial noise; same seed, same image.")
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=MAX_GUIDANCE_SCALE,
        description="Classifier-free guidance; the model's default if unset.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return value


def _check_side(name: str, value: int | None) -> int | None:
    if value is not None and (value % 8 or not MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE):
        raise ValueError(
            f"{name}={value} is not allowed: use a multiple of 8 "
            f"between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE}"
        )
    return value


class _Sized(_Body):
    width: int | None = Field(None, description="Multiple of 8; the model's default size if unset.")
    height: int | None = Field(None, description="Multiple of 8; the model's default size if unset.")
    num_inference_steps: int | None = Field(
        None, ge=1, le=MAX_INFERENCE_STEPS, description="Denoising steps."
    )

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int | None, info) -> int | None:
        return _check_side(info.field_name, value)


class PreviewBody(_Sized):
    """A preview round. With `image` or `preview_id` it edits that image toward the prompt, at `strength`
    or, without one, at the strength the edit predictor picks (from the image, the prompt and
    `previous_prompt`, the prompt the image was made for)."""

    image: str | None = Field(None, description="Previous image (base64 PNG) to edit.")
    preview_id: str | None = Field(None, max_length=64, description="Previous preview to edit, by id.")
    strength: float | None = Field(
        None, ge=0.0, le=1.0, description="Edit strength; predicted by the edit predictor if unset."
    )
    previous_prompt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="Prompt of the image being edited (what changed informs the edit predictor).",
    )
    session_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="The client's session. When the server speculates (refines a preview on idle cloud "
        "capacity before it is asked to), a newer preview of the same session supersedes the older "
        "preview's speculation. Unset: the preview is a session of its own (its speculation only expires).",
    )

    @model_validator(mode="after")
    def _edit_fields(self) -> PreviewBody:
        if self.image is not None and self.preview_id is not None:
            raise ValueError("give either image or preview_id, not both")
        is_edit = self.image is not None or self.preview_id is not None
        if self.strength is not None and not is_edit:
            raise ValueError("strength applies to an edit: also give image or preview_id")
        if self.previous_prompt is not None and not is_edit:
            raise ValueError("previous_prompt applies to an edit: also give image or preview_id")
        return self


class PreviewResponse(BaseModel):
    preview_id: str
    image: str = Field(description="base64 PNG")
    seed: int
    width: int
    height: int
    num_inference_steps: int
    strength: float | None = Field(None, description="The edit strength used (None for text-to-image).")
    strength_predicted: float | None = Field(
        None, description="The edit predictor's strength when the request gave none (then also `strength`)."
    )
    unet_calls: dict[str, int]
    timings_ms: dict[str, float]


class RefineBody(_Body):
    """Finalize: refine a preview on the cloud tier at the predicted (or given) strength."""

    image: str | None = Field(None, description="The preview to refine (base64 PNG).")
    preview_id: str | None = Field(None, max_length=64, description="The preview to refine, by id.")
    strength: float | None = Field(None, ge=0.0, le=1.0, description="Override the predicted strength.")
    num_inference_steps: int | None = Field(
        None, ge=1, le=MAX_INFERENCE_STEPS, description="Full-schedule steps."
    )
    latency_target_ms: float | None = Field(
        None, gt=0, le=600_000, description="Latency the router aims for."
    )
    speculation: Literal["on", "off"] = Field(
        "on",
        description="on: answer from a speculative refinement of the same preview, prompt, seed, strength "
        "and steps when there is one (same pixels); off: always refine now (comparisons, tests).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RefineBody:
        if (self.image is None) == (self.preview_id is None):
            raise ValueError("give exactly one of image or preview_id")
        return self


class RefineResponse(BaseModel):
    image: str = Field(description="base64 PNG")
    seed: int
    strength_predicted: float | None = Field(description="None when the request gave the strength")
    strength_used: float
    num_inference_steps: int
    route: Route
    reason: str
    load: dict[str, float] = Field(
        description="The cloud load the router read (empty when a finished speculation answered: nothing "
        "was routed)."
    )
    expected_latency_ms: float | None = Field(
        None, description="The router's predicted latency of this refinement (None: not measured yet)."
    )
    unet_calls: dict[str, int] = Field(description="What the answer cost, wherever it ran (speculation too).")
    timings_ms: dict[str, float]
    speculative: Literal["hit", "promoted", "miss", "off"] = Field(
        "off",
        description="hit: a finished speculative refinement answered; promoted: a running one was made "
        "foreground work and awaited; miss: none to use, refined now; off: no speculation looked up.",
    )


class GenerateBody(_Sized):
    """One-shot text-to-image in a chosen collaboration mode."""

    mode: Mode = Mode.DIFFUSIONX
    switch_step: int | None = Field(None, ge=0, le=MAX_INFERENCE_STEPS, description="hybrid/ec-diff: s")
    warmup_steps: int | None = Field(None, ge=2, le=MAX_INFERENCE_STEPS, description="ec-diff: p")
    approx_interval: int | None = Field(None, ge=0, le=MAX_INFERENCE_STEPS, description="ec-diff: k")
    smoothing: float | None = Field(None, ge=0.0, le=1.0, description="ec-diff: a")
    latency_target_ms: float | None = Field(None, gt=0, le=600_000, description="diffusionx: router target")

    @model_validator(mode="after")
    def _mode_fields(self) -> GenerateBody:
        ec_only = {
            "warmup_steps": self.warmup_steps,
            "approx_interval": self.approx_interval,
            "smoothing": self.smoothing,
        }
        given = [name for name, value in ec_only.items() if value is not None]
        if given and self.mode != Mode.EC_DIFF:
            raise ValueError(f"{', '.join(given)} only apply to mode 'ec-diff', not '{self.mode}'")
        if self.switch_step is not None and self.mode not in (Mode.HYBRID, Mode.EC_DIFF):
            raise ValueError(f"switch_step only applies to modes 'hybrid' and 'ec-diff', not '{self.mode}'")
        return self


class GenerateResponse(BaseModel):
    image: str = Field(description="base64 PNG")
    mode: Mode
    seed: int
    num_inference_steps: int
    unet_calls: dict[str, int]
    timings_ms: dict[str, float]
    parameters: dict[str, float | int | str | None] = Field(default_factory=dict)


class TierStats(BaseModel):
    queued: int = Field(description="Requests waiting for a batch slot")
    in_flight: int = Field(description="Requests in the batch being computed")
    queued_steps: int = Field(description="Denoising steps of queued plus in-flight work")
    replicas: int
    recent_batch_sizes: list[int]
    seconds_per_step: float | None
    step_time_s: list[float] | None = Field(
        None, description="Mean over replicas of (t0, t1) of the batched step time t(b) = t0 + t1 * b"
    )
    requests_served: int
    request_capacity: int | None = Field(
        None,
        description="Requests one caller may have at the tier before its bounded queue refuses more "
        "(replicas x max_ongoing_requests + max_queued_requests); null: unbounded or not reported",
    )
    per_replica: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Each replica's load report: step batcher pool (key, remaining steps), max_batch_size, "
        "step_time_s (t0, t1 of the batched step time t(b) = t0 + t1 * b)",
    )


class StatsResponse(BaseModel):
    tiers: dict[str, TierStats]
    preview_cache: dict[str, int]
    metrics_url: str | None = Field(
        None, description="Where Prometheus scrapes this node's metrics (Ray's, with the diffusionx_* ones)"
    )
    speculation: dict[str, Any] = Field(
        default_factory=dict,
        description="Speculative refinement: `results` (hit, promoted, miss, superseded, expired), "
        "`unet_calls` run in the background (used, wasted) and `held` (registered now)",
    )


class ErrorResponse(BaseModel):
    error: str
    status: int
