"""Named model specs: which checkpoint a short name means and how it is used.

A name resolves to a `ModelSpec`. Anything that is not a registered name is treated as a hub id or a local
path, so `load_model("runwayml/stable-diffusion-v1-5")` and `load_model("/models/my-sd")` also work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
EMBEDDED_SHAPES_DIR = PACKAGE_DIR / "models" / "shapes"


@dataclass(frozen=True)
class ModelSpec:
    """How to load one text-to-image model.

    `source` is a hub id or a local directory in diffusers format. `unet_subfolder` picks the UNet inside
    it, so two specs can share one directory (and therefore the same VAE and text encoder). Specs of the
    same `family` share latent space, tokenizer and text encoder and may be combined (refine, EC-Diff).
    """

    name: str
    source: str
    family: str
    tier: str  # "cloud" | "edge" | "test": the role the model is made for
    unet_subfolder: str = "unet"
    default_steps: int = 25
    preview_steps: int = 8
    guidance_scale: float = 7.5
    default_size: int = 512
    description: str = ""
    gpu_timed: str = ""  # a GPU profile role ("cloud" | "edge"): steps wait that GPU's t(b), see gpu_timed

    @property
    def is_local(self) -> bool:
        return Path(self.source).expanduser().exists()


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="sd15",
            source="stable-diffusion-v1-5/stable-diffusion-v1-5",
            family="sd15",
            tier="cloud",
            default_steps=50,
            description="Stable Diffusion v1.5 (860M UNet): the cloud tier in production.",
        ),
        ModelSpec(
            name="tiny-sd",
            source="segmind/tiny-sd",
            family="sd15",
            tier="edge",
            default_steps=25,
            preview_steps=10,
            description="Segmind Tiny-SD (distilled SD v1.5, 323M UNet): the edge tier in production.",
        ),
        ModelSpec(
            name="small-sd",
            source="segmind/small-sd",
            family="sd15",
            tier="edge",
            default_steps=25,
            preview_steps=12,
            description="Segmind Small-SD (distilled SD v1.5, 579M UNet).",
        ),
        ModelSpec(
            name="bk-sdm-tiny",
            source="nota-ai/bk-sdm-tiny",
            family="sd15",
            tier="edge",
            default_steps=25,
            preview_steps=10,
            description="BK-SDM-Tiny (block-removed SD v1.5, 323M UNet).",
        ),
        ModelSpec(
            name="shapes-cloud",
            source=str(EMBEDDED_SHAPES_DIR),
            family="shapes",
            tier="cloud",
            unet_subfolder="unet",
            default_steps=20,  # quality by step count: docs/results.md and the model card
            guidance_scale=4.0,
            default_size=32,
            description="Embedded cloud model of the shapes world (ships inside the package).",
        ),
        ModelSpec(
            name="shapes-edge",
            source=str(EMBEDDED_SHAPES_DIR),
            family="shapes",
            tier="edge",
            unet_subfolder="unet_edge",
            default_steps=8,
            preview_steps=8,  # a cheap preview; quality and cost: docs/results.md and the model card
            guidance_scale=4.0,
            default_size=32,
            description="Embedded edge model of the shapes world: small UNet, shared VAE/text encoder.",
        ),
        ModelSpec(
            name="sd15-gpu-timed",
            source=str(EMBEDDED_SHAPES_DIR),
            family="shapes",
            tier="cloud",
            unet_subfolder="unet_edge",  # its config shapes the stand-in (diffusionx.models.gpu_timed)
            default_steps=50,
            guidance_scale=4.0,
            default_size=32,
            description="SD v1.5's step and load times on a GPU profile's device; shapes images.",
            gpu_timed="cloud",
        ),
        ModelSpec(
            name="tiny-sd-gpu-timed",
            source=str(EMBEDDED_SHAPES_DIR),
            family="shapes",
            tier="edge",
            unet_subfolder="unet_edge",
            default_steps=25,
            preview_steps=8,
            guidance_scale=4.0,
            default_size=32,
            description="Tiny-SD's step and load times on a GPU profile's device; shapes images.",
            gpu_timed="edge",
        ),
        ModelSpec(
            name="sd15-arch",
            source="",  # built on first use, see diffusionx.models.arch
            family="sd15-arch",
            tier="cloud",
            default_steps=50,
            description="SD v1.5's architecture (860M UNet, VAE, CLIP ViT-L/14) with random weights: noise.",
        ),
        ModelSpec(
            name="tiny-sd-arch",
            source="",
            family="sd15-arch",
            tier="edge",
            unet_subfolder="unet_tiny_sd",
            default_steps=25,
            preview_steps=10,
            description="Segmind Tiny-SD's architecture (323M UNet), random weights, sd15-arch's VAE/CLIP.",
        ),
        ModelSpec(
            name="tiny-random",
            source="",  # built on first use, see diffusionx.models.tiny_random
            family="tiny-random",
            tier="test",
            default_steps=4,
            preview_steps=2,
            guidance_scale=2.0,
            default_size=32,
            description="Tiny randomly initialised SD pipeline for tests; produces noise, not pictures.",
        ),
        ModelSpec(
            name="tiny-random-edge",
            source="",
            family="tiny-random",
            tier="test",
            unet_subfolder="unet_edge",
            default_steps=4,
            preview_steps=2,
            guidance_scale=2.0,
            default_size=32,
            description="The smaller UNet of tiny-random, same VAE and text encoder (edge role in tests).",
        ),
    )
}


def get_spec(name_or_path: str) -> ModelSpec:
    """Returns the registered spec, or an ad-hoc spec for a hub id / local path."""
    if not name_or_path or not name_or_path.strip():
        raise ValueError(f"model must be a registered name ({', '.join(REGISTRY)}), a hub id or a local path")
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        if spec.family == "tiny-random":
            from diffusionx.models.tiny_random import ensure_tiny_random

            spec = replace(spec, source=str(ensure_tiny_random()))
        elif spec.family == "sd15-arch":
            from diffusionx.models.arch import ensure_arch_pair

            spec = replace(spec, source=str(ensure_arch_pair()))
        return spec
    return ModelSpec(name=name_or_path, source=name_or_path, family="custom", tier="custom")
