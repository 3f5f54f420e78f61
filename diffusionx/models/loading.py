"""Loading pipelines by registry name, hub id or local path, always through diffusers `from_pretrained`.

Components that two pipelines have in common (VAE, tokenizer, text encoder of one checkpoint directory, or
of a `share_with` pipeline of the same family) are loaded once and shared, as Tiny-SD shares SD v1.5's.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusionx.models.registry import REGISTRY, ModelSpec, get_spec


class ModelNotAvailableError(RuntimeError):
    """A checkpoint could not be found locally or on the hub."""


@dataclass
class LoadedModel:
    """A loaded text-to-image model: its spec and diffusers components on one device."""

    spec: ModelSpec
    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def text_embedding_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def shares_text_and_latents_with(self, other: LoadedModel) -> bool:
        return self.vae is other.vae and self.text_encoder is other.text_encoder


def select_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def select_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere (CPU kernels for fp16 are slow or missing), unless `dtype` is given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in allowed:
            raise ValueError(f"dtype must be one of {sorted(allowed)}, got {dtype!r}")
        return allowed[dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


_component_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def _not_available(
    spec: ModelSpec, reason: str, registered: tuple[str, ...] | None = None
) -> ModelNotAvailableError:
    source = spec.source
    if Path(source).expanduser().is_dir() or source.startswith(("/", ".", "~")):
        where = f"the local directory {source}"
    else:
        hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        where = f"the Hugging Face hub id '{source}' (cache HF_HOME={hf_home}" + (
            ", HF_HUB_OFFLINE=1 so the hub was not asked)" if offline else "; the hub could not be reached)"
        )
    if where.startswith("the local directory"):
        how = (
            "Check the path: it must be a diffusers pipeline directory (model_index.json, unet/, vae/, ...)."
            if registered is None
            else "Check the path: it must be a transformers model directory (config.json, weights)."
        )
    else:
        how = (
            "To use a local copy, download it on a machine with network access "
            f"(`huggingface-cli download {source} --local-dir DIR`) and pass DIR as the model, or point "
            "HF_HOME at a cache that holds it."
        )
    return ModelNotAvailableError(
        f"Model '{spec.name}' is not available: looked for {where}. Reason: {reason.rstrip('.')}. {how} "
        f"Registered names: {', '.join(REGISTRY if registered is None else registered)}."
    )


def _load_component(cls: Any, spec: ModelSpec, subfolder: str, device: torch.device, dtype: torch.dtype):
    key = (spec.source, subfolder, str(device), dtype)
    with _cache_lock:
        if key in _component_cache:
            return _component_cache[key]
    kwargs: dict[str, Any] = {"subfolder": subfolder}
    if hasattr(cls, "to") and subfolder not in ("tokenizer",):
        kwargs["torch_dtype"] = dtype
    component = cls.from_pretrained(spec.source, **kwargs)
    if hasattr(component, "to") and subfolder != "tokenizer":
        component = component.to(device)
        component.eval()
        component.requires_grad_(False)
    with _cache_lock:
        return _component_cache.setdefault(key, component)


def load_model(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    share_with: LoadedModel | None = None,
) -> LoadedModel:
    """Loads a model by registry name, hub id or local path.

    With `share_with` (a model of the same family, e.g. SD v1.5 for Tiny-SD), the VAE, tokenizer and text
    encoder of that model are reused instead of loaded again. Raises `ModelNotAvailableError` with one
    clear message when the checkpoint cannot be found.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from huggingface_hub.errors import HFValidationError
    from transformers import CLIPTextModel, CLIPTokenizer

    spec = get_spec(name_or_path)
    torch_device = select_device(device)
    torch_dtype = select_dtype(torch_device, dtype)
    source_path = Path(spec.source).expanduser()
    if spec.source.startswith(("/", ".", "~")) and not (source_path / "model_index.json").exists():
        raise _not_available(spec, "no model_index.json there (not a diffusers pipeline directory)")
    try:
        from diffusers import DDIMScheduler

        scheduler_config = dict(DDIMScheduler.load_config(spec.source, subfolder="scheduler"))
        unet = _load_component(UNet2DConditionModel, spec, spec.unet_subfolder, torch_device, torch_dtype)
        if share_with is not None:
            if share_with.spec.family != spec.family:
                raise ValueError(
                    f"cannot share components between '{spec.name}' (family {spec.family}) and "
                    f"'{share_with.spec.name}' (family {share_with.spec.family})"
                )
            vae, text_encoder, tokenizer = share_with.vae, share_with.text_encoder, share_with.tokenizer
        else:
            vae = _load_component(AutoencoderKL, spec, "vae", torch_device, torch_dtype)
            text_encoder = _load_component(CLIPTextModel, spec, "text_encoder", torch_device, torch_dtype)
            tokenizer = _load_component(CLIPTokenizer, spec, "tokenizer", torch_device, torch_dtype)
    except (OSError, HFValidationError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _not_available(spec, first_line) from None
    if spec.gpu_timed:  # keeps a GPU's time: each step waits t(b), the load waits the profile's load time
        from diffusionx.models.gpu_timed import GpuTimedUNet, ZeroNoise, load_profile

        times = load_profile().role(spec.gpu_timed)
        unet = GpuTimedUNet(ZeroNoise(unet), times, rows_per_sample=2 if spec.guidance_scale > 1.0 else 1)
        time.sleep(times.load_s)
    return LoadedModel(
        spec=spec,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler_config=scheduler_config,
        device=torch_device,
        dtype=torch_dtype,
    )


def load_pipeline(model: LoadedModel):
    """A diffusers `StableDiffusionPipeline` over a loaded model's components (for users who want one)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
