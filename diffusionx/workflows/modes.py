"""One-shot text-to-image by collaboration mode, in process (what `POST /v1/generate` runs).

Modes, so experiments can compare them on the same requests:
- `diffusionx` (default): the edge model previews at its preview step count, then the cloud model refines
  the preview with img2img at strength `s` (about `s × N` cloud UNet calls instead of `N`). `s` comes from
  the request, else from a strength predictor, else from the `strength` argument (DEFAULT_STRENGTH).
- `cloud`: text-to-image on the cloud model (its default step count).
- `edge`: text-to-image on the edge model (its default step count, not the preview count).
- `hybrid`: Hybrid SD, cloud for the first `switch_step` steps, edge for the rest.
- `ec-diff`: EC-Diff, Hybrid SD plus the K-step noise approximation (p, k, a), defaults scaled from the
  reference `p=7, k=2, a=0.3, s=37` at 50 steps.

Every result's `unet_calls` sums all tiers' work for that image. A parameter that the chosen mode does not
use is refused, not ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from diffusionx.models.loading import LoadedModel
from diffusionx.requests import (
    GenerationResult,
    Img2ImgRequest,
    InvalidRequestError,
    PreviewRequest,
    check_steps,
    check_strength,
)
from diffusionx.sampling.collaborative import (
    CollaborationParams,
    CollaborativeRequest,
    generate_collaborative,
)
from diffusionx.sampling.generation import preview, text_to_image
from diffusionx.sampling.step_batching import refine_step_batched

MODES: tuple[str, ...] = ("diffusionx", "cloud", "edge", "hybrid", "ec-diff")
DEFAULT_MODE = "diffusionx"
# Refinement strength when neither the request nor a predictor gives one (the predictor replaces it).
DEFAULT_STRENGTH = 0.6

# (preview images, prompts) -> one strength per image, in [0, 1]
StrengthPredictor = Callable[[Sequence[Image.Image], Sequence[str]], Sequence[float]]

# which optional request fields each mode reads
_MODE_FIELDS: dict[str, frozenset[str]] = {
    "diffusionx": frozenset({"strength", "preview_steps"}),
    "cloud": frozenset(),
    "edge": frozenset(),
    "hybrid": frozenset({"switch_step"}),
    "ec-diff": frozenset({"switch_step", "warmup_steps", "approx_interval", "smoothing"}),
}
_OPTIONAL_FIELDS = (
    "switch_step",
    "warmup_steps",
    "approx_interval",
    "smoothing",
    "strength",
    "preview_steps",
)


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
    strength: float | None = None  # refine strength (diffusionx)
    preview_steps: int | None = None  # edge preview steps (diffusionx)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strength is not None:
            check_strength(self.strength)
        if self.preview_steps is not None:
            check_steps(self.preview_steps, "preview_steps")
        # p, k, a and s are checked against N by CollaborationParams when the mode is known


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidRequestError(f"mode={mode!r} is not allowed: use one of {', '.join(MODES)}")
    return mode


def _check_fields(mode: str, request: PreviewRequest) -> None:
    for name in _OPTIONAL_FIELDS:
        if getattr(request, name, None) is not None and name not in _MODE_FIELDS[mode]:
            users = [m for m, fields in _MODE_FIELDS.items() if name in fields]
            raise InvalidRequestError(
                f"{name} does not apply to mode '{mode}': it is a parameter of {' and '.join(users)}"
            )


def collaboration_params(mode: str, request: PreviewRequest, cloud: LoadedModel) -> CollaborationParams:
    """The sampler parameters of a `hybrid` or `ec-diff` request (N defaults to the cloud's step count)."""
    steps = request.num_inference_steps or cloud.spec.default_steps
    if mode == "hybrid":
        return CollaborationParams.hybrid(
            steps, switch_step=getattr(request, "switch_step", None), guidance_scale=request.guidance_scale
        )
    if mode == "ec-diff":
        return CollaborationParams.ec_diff(
            steps,
            switch_step=getattr(request, "switch_step", None),
            warmup_steps=getattr(request, "warmup_steps", None),
            approx_interval=getattr(request, "approx_interval", None),
            smoothing=getattr(request, "smoothing", None),
            guidance_scale=request.guidance_scale,
        )
    raise InvalidRequestError(f"mode '{mode}' has no collaboration parameters; only hybrid and ec-diff do")


def _need(model: LoadedModel | None, tier: str, mode: str) -> LoadedModel:
    if model is None:
        raise ValueError(f"mode '{mode}' needs the {tier} model, but none was given")
    return model


def _plain(request: PreviewRequest, steps: int | None) -> PreviewRequest:
    return PreviewRequest(
        request.prompt, request.seed, request.width, request.height, steps, request.guidance_scale
    )


def generate(
    mode: str,
    cloud: LoadedModel | None,
    edge: LoadedModel | None,
    requests: Sequence[PreviewRequest],
    *,
    strength: float = DEFAULT_STRENGTH,
    strength_predictor: StrengthPredictor | None = None,
) -> list[GenerationResult]:
    """Text-to-image for each request in `mode`; results in request order with summed `unet_calls`.

    `strength` and `strength_predictor` matter only in `diffusionx` mode (a request's own `strength` wins
    over the predictor, which wins over `strength`). Requests with the same parameters run as one batch.
    """
    check_mode(mode)
    check_strength(strength)
    for request in requests:
        _check_fields(mode, request)
    if not requests:
        return []
    # 1. single-model baselines
    if mode == "cloud":
        model = _need(cloud, "cloud", mode)
        return text_to_image(model, [_plain(r, r.num_inference_steps) for r in requests], tier="cloud")
    if mode == "edge":
        model = _need(edge, "edge", mode)
        steps = [r.num_inference_steps or model.spec.default_steps for r in requests]
        return text_to_image(model, [_plain(r, n) for r, n in zip(requests, steps, strict=True)], tier="edge")
    # 2. EC-Diff / Hybrid SD: one sampler over both UNets
    cloud, edge = _need(cloud, "cloud", mode), _need(edge, "edge", mode)
    if mode in ("hybrid", "ec-diff"):
        collaborative = [
            CollaborativeRequest(r.prompt, r.seed, r.width, r.height, collaboration_params(mode, r, cloud))
            for r in requests
        ]
        return generate_collaborative(cloud, edge, collaborative)
    # 3. DiffusionX: edge preview, then predicted-strength cloud refine of the preview
    start = time.perf_counter()
    previews = preview(edge, [_plain(r, getattr(r, "preview_steps", None)) for r in requests])
    preview_ms = (time.perf_counter() - start) * 1000.0
    strengths: list[float | None] = [getattr(r, "strength", None) for r in requests]
    if strength_predictor is not None and any(s is None for s in strengths):
        predicted = list(strength_predictor([p.image for p in previews], [r.prompt for r in requests]))
        if len(predicted) != len(requests):
            raise ValueError(
                f"strength predictor gave {len(predicted)} strengths for {len(requests)} previews"
            )
        strengths = [
            check_strength(p, "predicted strength") if s is None else s
            for s, p in zip(strengths, predicted, strict=True)
        ]
    refine_requests = [
        Img2ImgRequest(
            r.prompt,
            p.image,
            strength if s is None else s,
            r.seed,
            r.num_inference_steps,
            r.guidance_scale,
        )
        for r, p, s in zip(requests, previews, strengths, strict=True)
    ]
    # predicted strengths differ per preview: step-level batching lets them share UNet calls
    refined = refine_step_batched(cloud, refine_requests, max_batch_size=max(1, len(refine_requests)))
    results = []
    for prev, final in zip(previews, refined, strict=True):
        timings = {f"preview_{key}": value for key, value in prev.timings_ms.items()}
        timings.update({f"refine_{key}": value for key, value in final.timings_ms.items()})
        timings["preview_batch_ms"] = round(preview_ms, 3)
        results.append(
            GenerationResult(
                final.image,
                final.seed,
                prev.unet_calls + final.unet_calls,
                final.num_inference_steps,
                final.strength,
                timings,
                final.batch_size,
            )
        )
    return results
