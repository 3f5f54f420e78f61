"""DiffusionX: interactive text-to-image across a light edge model and a heavy cloud model.

The library holds the model math and policies and never imports Ray; `deployments/` binds it to Ray Serve.
"""

from diffusionx.models.loading import LoadedModel, ModelNotAvailableError, load_model
from diffusionx.models.registry import REGISTRY, ModelSpec, get_spec
from diffusionx.requests import (
    GenerationResult,
    Img2ImgRequest,
    InvalidRequestError,
    PreviewRequest,
    UnetCalls,
)
from diffusionx.sampling.generation import edit, preview, refine, text_to_image

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "GenerationResult",
    "Img2ImgRequest",
    "InvalidRequestError",
    "LoadedModel",
    "ModelNotAvailableError",
    "ModelSpec",
    "PreviewRequest",
    "UnetCalls",
    "edit",
    "get_spec",
    "load_model",
    "preview",
    "refine",
    "text_to_image",
]
