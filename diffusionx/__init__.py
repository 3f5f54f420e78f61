"""DiffusionX: interactive text-to-image across a light edge model and a heavy cloud model.

The library holds the model math, the policies, the model loop and the workflows, and never imports Ray;
`deployments/` binds it to Ray Serve. Importing `diffusionx` itself loads nothing heavy (the torch-free
clients import its codec and request limits); the names below are imported on first use.

Subpackages: `models` (registry, loading, tokenizer, tiny pipelines, shipped weights), `sampling`
(text-to-image, img2img, step-level batching, EC-Diff / Hybrid SD), `policy` (strength predictor, router),
`engine` (model loop, load bookkeeping, preview cache, tier objects), `workflows` (every mode, once),
`experiments` (eval, compare, search), `shapes` (the embedded world). Top-level modules: `requests` (types
and limits), `api` (HTTP schemas), `app_config` (typed application args), `imaging` (the PNG codec), `cli`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "edit": "diffusionx.sampling.generation",
    "preview": "diffusionx.sampling.generation",
    "refine": "diffusionx.sampling.generation",
    "text_to_image": "diffusionx.sampling.generation",
    "LoadedModel": "diffusionx.models.loading",
    "ModelNotAvailableError": "diffusionx.models.loading",
    "load_model": "diffusionx.models.loading",
    "REGISTRY": "diffusionx.models.registry",
    "ModelSpec": "diffusionx.models.registry",
    "get_spec": "diffusionx.models.registry",
    "GenerationResult": "diffusionx.requests",
    "Img2ImgRequest": "diffusionx.requests",
    "InvalidRequestError": "diffusionx.requests",
    "PreviewRequest": "diffusionx.requests",
    "UnetCalls": "diffusionx.requests",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusionx' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
