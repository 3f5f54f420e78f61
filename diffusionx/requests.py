"""Request and result types of the library, with their validation.

Every limit is checked at the boundary and reported with a message that names the value and what is
allowed (nothing is silently clipped). The HTTP schemas in `diffusionx.api` apply the same limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TypedDict

from PIL import Image

MAX_PROMPT_CHARS = 1000
MAX_IMAGE_SIDE = 1024
MIN_IMAGE_SIDE = 8
MAX_INFERENCE_STEPS = 200
MAX_GUIDANCE_SCALE = 30.0
MAX_SEED = 2**32 - 1


class StrEnum(str, Enum):
    """A name of the API's vocabulary: compares, hashes, prints and serialises as its string value
    (`enum.StrEnum` from Python 3.11, kept here for 3.10)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Mode(StrEnum):
    """How `/v1/generate` makes an image (`diffusionx.workflows.modes.generate`)."""

    DIFFUSIONX = "diffusionx"  # edge preview, then a predicted-strength cloud refinement
    CLOUD = "cloud"  # text-to-image on the cloud tier
    EDGE = "edge"  # text-to-image on the edge tier
    HYBRID = "hybrid"  # Hybrid SD: cloud for the first s steps, edge for the rest
    EC_DIFF = "ec-diff"  # EC-Diff: Hybrid SD with the cloud's noise extrapolated between calls


class Route(StrEnum):
    """Where the router sends a refinement (`diffusionx.policy.router.decide_route`)."""

    CLOUD = "cloud"  # the full refinement on the cloud tier
    CLOUD_REDUCED = "cloud-reduced"  # fewer steps or a lower strength, to meet the latency target
    EDGE_FALLBACK = "edge-fallback"  # the edge tier refines instead


class TierInfo(TypedDict, total=False):
    """A tier's fixed facts (`info()`): its model and default step counts, or its predictors' names."""

    model: str
    default_size: int
    default_steps: int
    preview_steps: int
    edit_steps: int
    family: str
    predictor: str
    edit_predictor: str
    prepares_edits: bool


class InvalidRequestError(ValueError):
    """A request that cannot be served as given; the message says what is allowed."""


@dataclass
class UnetCalls:
    """Cost of one image: real UNet evaluations per tier, and steps whose noise was extrapolated.

    A classifier-free-guided step evaluates the UNet on the (unconditional, conditional) pair in one batch;
    that counts as one call.
    """

    cloud: int = 0
    edge: int = 0
    approximated: int = 0

    def __add__(self, other: UnetCalls) -> UnetCalls:
        return UnetCalls(
            self.cloud + other.cloud, self.edge + other.edge, self.approximated + other.approximated
        )

    def to_dict(self) -> dict[str, int]:
        return {"cloud": self.cloud, "edge": self.edge, "approximated": self.approximated}


@dataclass
class GenerationResult:
    image: Image.Image
    seed: int
    unet_calls: UnetCalls
    num_inference_steps: int
    strength: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


def with_predict_time(result: GenerationResult, predict_ms: float) -> GenerationResult:
    """`result` with the strength prediction's milliseconds first among its timings."""
    result.timings_ms = {"predict": predict_ms, **result.timings_ms}
    return result


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("prompt must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed"
        )
    return prompt


def check_side(name: str, value: int, multiple: int = 8) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if value < MIN_IMAGE_SIDE or value > MAX_IMAGE_SIDE or value % multiple:
        raise InvalidRequestError(
            f"{name}={value} is not allowed: use a multiple of {multiple} "
            f"between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE}"
        )
    return value


def check_steps(value: int, name: str = "num_inference_steps") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INFERENCE_STEPS:
        raise InvalidRequestError(
            f"{name}={value!r} is not allowed: use an integer from 1 to {MAX_INFERENCE_STEPS}"
        )
    return value


def check_strength(value: float, name: str = "strength") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise InvalidRequestError(f"{name}={value!r} is not allowed: use a number from 0.0 to 1.0")
    return float(value)


def check_guidance(value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.0 <= value <= MAX_GUIDANCE_SCALE
    ):
        raise InvalidRequestError(
            f"guidance_scale={value!r} is not allowed: use a number from 0.0 to {MAX_GUIDANCE_SCALE}"
        )
    return float(value)


def check_seed(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise InvalidRequestError(f"seed={value!r} is not allowed: use an integer from 0 to {MAX_SEED}")
    return value


def check_text_request(prompt: str, seed: int, width: int | None, height: int | None) -> None:
    """The fields every text-to-image request has; unset sizes take the model's default."""
    check_prompt(prompt)
    check_seed(seed)
    if width is not None:
        check_side("width", width)
    if height is not None:
        check_side("height", height)


@dataclass
class PreviewRequest:
    """Text-to-image on the edge model. Unset fields take the model's defaults."""

    prompt: str
    seed: int = 0
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        check_text_request(self.prompt, self.seed, self.width, self.height)
        if self.num_inference_steps is not None:
            check_steps(self.num_inference_steps)
        if self.guidance_scale is not None:
            check_guidance(self.guidance_scale)


@dataclass
class EditRequest:
    """A round-to-round edit whose strength the edge tier's own edit predictor picks (`EdgeModel` built
    with `predict_edit`): the previous image, the new prompt and the previous one."""

    prompt: str
    image: Image.Image
    previous_prompt: str | None = None
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        self.at(1.0)  # checks the fields as the edit it becomes, before its strength is predicted
        if self.previous_prompt is not None:
            check_prompt(self.previous_prompt)

    def at(self, strength: float) -> Img2ImgRequest:
        """The edit at `strength` (validated there, with the rest of the request)."""
        return Img2ImgRequest(
            self.prompt,
            self.image,
            check_strength(strength, "predicted edit strength"),
            seed=self.seed,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
        )


@dataclass
class Img2ImgRequest:
    """Img2img: noise `image` to `strength`, then denoise toward `prompt` (an edit on the edge tier, a
    refinement on the cloud tier). Runs `int(num_inference_steps * strength)` UNet steps.

    `owner` (an API key's owner id, "" without keys) and `owner_weight` (that key's weight) say whose
    work it is: the cloud tier's step batcher shares its slots among owners by weight."""

    prompt: str
    image: Image.Image
    strength: float
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    owner: str = ""
    owner_weight: float = 1.0

    def __post_init__(self) -> None:
        check_prompt(self.prompt)
        check_seed(self.seed)
        check_strength(self.strength)
        if not self.owner_weight > 0:
            raise InvalidRequestError(f"owner_weight={self.owner_weight} is not allowed: use a weight > 0")
        if not isinstance(self.image, Image.Image):
            raise InvalidRequestError(f"image must be a PIL image, got {type(self.image).__name__}")
        check_side("image width", self.image.width)
        check_side("image height", self.image.height)
        if self.num_inference_steps is not None:
            check_steps(self.num_inference_steps)
        if self.guidance_scale is not None:
            check_guidance(self.guidance_scale)
