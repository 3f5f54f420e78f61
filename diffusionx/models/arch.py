"""`sd15-arch` / `tiny-sd-arch`: the production pair's architectures with random weights.

No model hub is reachable here, but the architectures are public configurations. This module writes them
down (the `config.json` files of the published checkpoints, cited per dict), builds them with random
weights under fixed seeds, and saves them once, in diffusers format, into the project's home directory
(`DIFFUSIONX_HOME`, see `tiny_random.cache_dir`). From then on they load through `from_pretrained` exactly
like a downloaded checkpoint, so every size-dependent path (64x64 latents, 77-token prompts, memory of a
batch, a model load of a minute, fp16 on CUDA) runs at production size. They produce noise, not pictures.

One directory holds both UNets over one VAE, CLIP ViT-L/14 text encoder and tokenizer, as Tiny-SD shares
SD v1.5's: `unet/` is SD v1.5's UNet (cloud tier), `unet_tiny_sd/` is Segmind Tiny-SD's (edge tier).

Weights are stored in fp16 (safetensors). The published checkpoints are distributed in fp16 as well (the
`fp16` variant of SD v1.5; Tiny-SD's release), random values lose nothing by it, and it halves what is
written (2.2 GB instead of 4.4 GB) and read at every replica start; `from_pretrained(torch_dtype=float32)`
upcasts on the CPU, fp16 on CUDA loads as stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # diffusers is imported where a model is built (it is slow to import)
    from diffusers import ModelMixin

from diffusionx.models.tiny_random import build_once, cache_dir

ARCH_VERSION = "v1"
ARCH_DIR_NAME = f"sd15-arch-{ARCH_VERSION}"
TOKENIZER_MAX_LENGTH = 77  # CLIP's context length (max_position_embeddings)
CLIP_VOCAB_SIZE = 49408

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (UNet2DConditionModel, 859.52M parameters)
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# segmind/tiny-sd, unet/config.json: SD v1.5's UNet with blocks removed as BK-SDM-Tiny does (Kim et al.
# 2023; segmind/distill-sd `prepare_unet(unet, "tiny")`): no mid block, one ResNet + attention per down
# block instead of two, the 4th (attention-free, 1280-channel) down block and the 1st up block removed, two
# layers per up block instead of three. In diffusers terms: three blocks, layers_per_block 1, no mid block.
TINY_SD_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "mid_block_type": None,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json (AutoencoderKL, 83.65M parameters)
SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5, text_encoder/config.json: the text tower of OpenAI CLIP
# ViT-L/14 (CLIPTextModel, 123.06M parameters). bos/eos/pad ids come from the tokenizer written here.
CLIP_VIT_L14_TEXT_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": TOKENIZER_MAX_LENGTH,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": CLIP_VOCAB_SIZE,
}

# stable-diffusion-v1-5/stable-diffusion-v1-5, scheduler/scheduler_config.json (the library samples with
# DDIM over these betas, as it does for the real checkpoint)
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

# Parameter counts of the published checkpoints (the model cards and papers give the rounded figures:
# SD v1.5 UNet 859.52M, VAE 83.65M, CLIP ViT-L/14 text 123.06M; Segmind Tiny-SD / BK-SDM-Tiny UNet 323.4M).
PUBLISHED_PARAMETERS: dict[str, int] = {
    "unet": 859_520_964,
    "unet_tiny_sd": 323_384_964,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
}

WORDS = (
    "a an the of on in at and with by to from for is photo picture painting drawing portrait landscape "
    "illustration render style art detailed highly realistic cinematic lighting cat dog horse bird man woman "
    "person child house tree car city street forest mountain sea ocean river lake sky cloud sun moon star "
    "night day sunset sunrise red green blue yellow white black purple orange pink brown gold silver small "
    "large big tiny old young beautiful astronaut riding castle flower garden field snow rain fire water"
).split()


def build_component(subfolder: str) -> torch.nn.Module:
    """One component from its published config, on the current default device (use `torch.device("meta")`
    to build it without memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if subfolder == "unet":
        return UNet2DConditionModel(**SD15_UNET_CONFIG)
    if subfolder == "unet_tiny_sd":
        return UNet2DConditionModel(**TINY_SD_UNET_CONFIG)
    if subfolder == "vae":
        return AutoencoderKL(**SD15_VAE_CONFIG)
    if subfolder == "text_encoder":
        # CLIP's tokenizer puts start/end last: ids vocab-2, vocab-1; it pads with the end token
        ids = {"bos_token_id": CLIP_VOCAB_SIZE - 2, "eos_token_id": CLIP_VOCAB_SIZE - 1}
        return CLIPTextModel(
            CLIPTextConfig(**CLIP_VIT_L14_TEXT_CONFIG, **ids, pad_token_id=ids["eos_token_id"])
        )
    raise ValueError(f"unknown component {subfolder!r}: use one of {', '.join(PUBLISHED_PARAMETERS)}")


def count_parameters(subfolder: str) -> int:
    """Parameters of a component, counted on the meta device (no weights are materialised)."""
    with torch.device("meta"):
        module = build_component(subfolder)
    return sum(p.numel() for p in module.parameters())


def arch_dir() -> Path:
    return cache_dir() / ARCH_DIR_NAME


def ensure_arch_pair() -> Path:
    """Returns the directory of the pair, building it on first use (atomic, race-safe; a few minutes)."""
    return build_once(arch_dir(), build_arch_pair)


def _random_component(subfolder: str, seed: int, dtype: torch.dtype) -> ModelMixin:
    # PyTorch's default initialisation (fan-in scaled) keeps activations finite through 860M random
    # parameters, in fp16 too; it runs on the CPU in fp32, then the weights are cast for storage
    torch.manual_seed(seed)
    return (
        build_component(subfolder).half().eval()
        if dtype == torch.float16
        else build_component(subfolder).eval()
    )


def build_arch_pair(directory: Path, dtype: torch.dtype = torch.float16) -> None:
    """Writes the pair in diffusers format: SD v1.5 pipeline layout plus `unet_tiny_sd/`."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from tqdm import tqdm

    from diffusionx.models.tokenizer import write_clip_tokenizer

    directory = Path(directory)
    bar = tqdm(total=5, desc="building sd15-arch / tiny-sd-arch", unit="component")
    tokenizer = write_clip_tokenizer(
        directory / "tokenizer", WORDS, model_max_length=TOKENIZER_MAX_LENGTH, vocab_size=CLIP_VOCAB_SIZE
    )
    if len(tokenizer) != CLIP_VOCAB_SIZE or tokenizer.eos_token_id != CLIP_VOCAB_SIZE - 1:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    bar.update(1)
    # one fp32 UNet in memory at a time while initialising (SD v1.5's is 3.4 GB in fp32)
    tiny_unet = _random_component("unet_tiny_sd", 0, dtype)
    tiny_unet.save_pretrained(directory / "unet_tiny_sd", safe_serialization=True)
    del tiny_unet
    bar.update(1)
    vae, text_encoder = _random_component("vae", 1, dtype), _random_component("text_encoder", 2, dtype)
    bar.update(2)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_random_component("unet", 3, dtype),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    bar.update(1)
    bar.close()
