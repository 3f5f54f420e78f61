"""`tiny-random`: a tiny randomly initialised Stable Diffusion pipeline for tests.

Built from tiny configs under a fixed seed, saved once in diffusers format, then loaded through
`from_pretrained` exactly like a real checkpoint. Like the embedded shapes models it holds two UNets over
one VAE/text encoder (`unet` for the cloud role, the smaller `unet_edge` for the edge role), so every
collaboration mode can be tested on it. It produces noise, not pictures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TINY_RANDOM_VERSION = "v2"
TOKENIZER_MAX_LENGTH = 32
WORDS = (
    "a an the of on in at and with photo picture painting drawing cat dog house tree car red green blue "
    "yellow white black purple orange small large big circle square triangle left right top bottom center "
    "background sky sea mountain city night day sunset portrait landscape"
).split()


def cache_dir() -> Path:
    """Where the project writes generated artefacts (override with DIFFUSIONX_HOME)."""
    return Path(os.environ.get("DIFFUSIONX_HOME", Path.home() / ".cache" / "diffusionx")).expanduser()


def build_once(target: Path, build: Callable[[Path], None], marker: str = "model_index.json") -> Path:
    """Returns `target`, first building it with `build(staging_dir)` if it has no `marker` file: built in
    a staging directory beside it and renamed into place, so a half-written model is never seen and two
    processes building at once both end with one complete copy."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_random() -> Path:
    """Returns the directory of the tiny-random pipeline, building it on first use (atomic, race-safe)."""
    return build_once(cache_dir() / f"tiny-random-{TINY_RANDOM_VERSION}", build_tiny_random)


def build_tiny_random(directory: Path) -> None:
    """Builds and saves the pipeline (cloud UNet in `unet/`, edge UNet in `unet_edge/`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusionx.models.tokenizer import write_clip_tokenizer
    from diffusionx.shapes.train import SCHEDULER_CONFIG  # one DDIM schedule for every model built here

    tokenizer = write_clip_tokenizer(directory / "tokenizer", WORDS, model_max_length=TOKENIZER_MAX_LENGTH)
    unet = _unet(channels=(8, 16), heads=4, seed=0)
    unet_edge = _unet(channels=(4, 8), heads=2, seed=1)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
        )
    )
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    unet_edge.save_pretrained(directory / "unet_edge", safe_serialization=True)


def _unet(channels: tuple[int, int], heads: int, seed: int):
    """A two-level UNet of the tiny-random pair (the edge one is narrower), seeded."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=heads,
        norm_num_groups=channels[0] // 2,
    )
