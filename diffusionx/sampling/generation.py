"""Preview, edit and refine: the library's text-to-image and img2img over lists of requests.

One DDIM loop serves every tier. Requests that share shape, step count, guidance and strength run as one
batch; each request draws its noise from its own seeded generator on the CPU, so its image does not
depend on what else is in the batch (or on the device). `unet_calls` counts denoising steps that ran the
UNet (a classifier-free-guided pair is one call).

Symbols: x_t -> `latents`, eps -> `noise_pred`, alpha-bar schedule -> the DDIM scheduler's.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from diffusionx.models.loading import LoadedModel
from diffusionx.requests import (
    GenerationResult,
    Img2ImgRequest,
    InvalidRequestError,
    PreviewRequest,
    UnetCalls,
    check_side,
)

Request = TypeVar("Request")

# A fast (Rust) tokenizer keeps its padding/truncation settings in shared state that each call rewrites, so
# two threads tokenizing at once (in process, the edge and cloud loops share one tokenizer; prompts are also
# checked on the event loop) can get each other's padding. Every call goes through this lock.
_TOKENIZER_LOCK = threading.Lock()


def make_scheduler(model: LoadedModel, num_inference_steps: int) -> DDIMScheduler:
    """A fresh DDIM scheduler per call: no state is shared between requests."""
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device=model.device)
    return scheduler


def tokenize(tokenizer: Any, texts: str | Sequence[str], **kwargs: Any) -> Any:
    """`tokenizer(texts, **kwargs)` under `_TOKENIZER_LOCK` (the text predictors' features use it too)."""
    with _TOKENIZER_LOCK:
        return tokenizer(texts if isinstance(texts, str) else list(texts), **kwargs)


def check_prompt_fits(model: LoadedModel, prompts: Sequence[str]) -> None:
    limit = model.tokenizer.model_max_length
    for prompt in prompts:
        n_tokens = len(tokenize(model.tokenizer, prompt).input_ids)
        if n_tokens > limit:
            raise InvalidRequestError(
                f"prompt is {n_tokens} tokens long; model '{model.spec.name}' reads at most {limit} "
                "(including start and end tokens). Shorten the prompt."
            )


@torch.no_grad()
def encode_prompt(model: LoadedModel, prompts: Sequence[str], guidance_scale: float) -> torch.Tensor:
    """Text embeddings, (B, L, D); with guidance, (2B, L, D) as [unconditional; conditional]."""

    def embed(texts: Sequence[str]) -> torch.Tensor:
        ids = tokenize(
            model.tokenizer,
            texts,
            padding="max_length",
            max_length=model.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(model.device)
        return model.text_encoder(ids)[0].to(model.dtype)

    conditional = embed(prompts)
    if guidance_scale <= 1.0:
        return conditional
    return torch.cat([embed([""] * len(prompts)), conditional])


@torch.no_grad()
def predict_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    text_embeddings: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """eps_theta(x_t, t, c), with classifier-free guidance when `guidance_scale` > 1."""
    if guidance_scale <= 1.0:
        return unet(latents, timestep, encoder_hidden_states=text_embeddings).sample
    model_input = torch.cat([latents, latents])
    noise_uncond, noise_text = unet(
        model_input, timestep, encoder_hidden_states=text_embeddings
    ).sample.chunk(2)
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], model: LoadedModel) -> torch.Tensor:
    """(B, *shape) standard normal noise; row i depends only on seeds[i] (drawn on the CPU)."""
    rows = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=model.device, dtype=model.dtype)


def latent_shape(model: LoadedModel, width: int, height: int) -> tuple[int, int, int]:
    factor = model.vae_scale_factor
    for name, side in (("width", width), ("height", height)):
        check_side(name, side, multiple=max(8, factor))
    return (model.latent_channels, height // factor, width // factor)


@torch.no_grad()
def decode_latents(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    images = model.vae.decode(latents / model.vae.config.scaling_factor).sample  # (B, 3, H, W) in [-1, 1]
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(array) for array in images.permute(0, 2, 3, 1).cpu().numpy()]


@torch.no_grad()
def encode_images(model: LoadedModel, images: Sequence[Image.Image]) -> torch.Tensor:
    """x_0 latents of RGB images (posterior mean, so the same image always gives the same latents)."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for image in images])
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).to(device=model.device, dtype=model.dtype)
    return model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor


@torch.no_grad()
def denoise(
    model: LoadedModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_embeddings: torch.Tensor,
    guidance_scale: float,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The DDIM loop x_T -> x_0 over `timesteps`; one UNet call per step. `on_step(step, total)` is called
    after each step (1-based), as diffusers' `callback_on_step_end` is (here it feeds streamed progress)."""
    total = len(timesteps)
    for index, t in enumerate(timesteps):
        noise_pred = predict_noise(model.unet, latents, t, text_embeddings, guidance_scale)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        if on_step is not None:
            on_step(index + 1, total)
    return latents


StepCallback = Callable[[Sequence[Any], int, int], None]  # (the requests of a batch, step, total steps)
ImageEncoder = Callable[[Sequence[Image.Image]], torch.Tensor]  # images -> (B, C, h, w) x_0 latents


def _group_callback(on_step: StepCallback | None, group: Sequence[Any]) -> Callable[[int, int], None] | None:
    if on_step is None:
        return None
    return lambda step, total: on_step(group, step, total)


def run_in_groups(
    requests: Sequence[Request],
    key: Callable[[Request], Hashable],
    run_group: Callable[[list[Request]], list[GenerationResult]],
) -> list[GenerationResult]:
    """Runs requests that share `key` as one batch each, and returns results in request order."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, request in enumerate(requests):
        groups[key(request)].append(index)
    results: list[GenerationResult | None] = [None] * len(requests)
    for indices in groups.values():
        for index, result in zip(indices, run_group([requests[i] for i in indices]), strict=True):
            results[index] = result
    return results  # type: ignore[return-value]


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


def text_to_image(
    model: LoadedModel, requests: Sequence[PreviewRequest], tier: str, on_step: StepCallback | None = None
) -> list[GenerationResult]:
    """Text-to-image for each request; `tier` ("edge" or "cloud") is where its UNet calls are counted.
    `on_step(group, step, total)` reports each denoising step of each batch it runs."""
    spec = model.spec

    def resolved(request: PreviewRequest) -> tuple[int, int, int, float]:
        return (
            request.width or spec.default_size,
            request.height or spec.default_size,
            request.num_inference_steps or (spec.preview_steps if tier == "edge" else spec.default_steps),
            spec.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        )

    def run_group(group: list[PreviewRequest]) -> list[GenerationResult]:
        width, height, steps, guidance = resolved(group[0])
        start = time.perf_counter()
        check_prompt_fits(model, [r.prompt for r in group])
        # 1. encode prompts
        embeddings = encode_prompt(model, [r.prompt for r in group], guidance)
        text_ms = _ms(start)
        # 2. prepare x_T from each request's own seed
        scheduler = make_scheduler(model, steps)
        latents = seeded_noise([r.seed for r in group], latent_shape(model, width, height), model)
        latents = latents * scheduler.init_noise_sigma
        # 3. denoising loop
        unet_start = time.perf_counter()
        latents = denoise(
            model,
            scheduler,
            latents,
            scheduler.timesteps,
            embeddings,
            guidance,
            _group_callback(on_step, group),
        )
        unet_ms = _ms(unet_start)
        # 4. decode
        vae_start = time.perf_counter()
        images = decode_latents(model, latents)
        timings = {"text_encoder": text_ms, "unet": unet_ms, "vae": _ms(vae_start), "model_total": _ms(start)}
        calls = UnetCalls(**{tier: steps})
        return [
            GenerationResult(image, r.seed, calls, steps, None, dict(timings), len(group))
            for image, r in zip(images, group, strict=True)
        ]

    return run_in_groups(requests, resolved, run_group)


def img2img(
    model: LoadedModel,
    requests: Sequence[Img2ImgRequest],
    tier: str,
    on_step: StepCallback | None = None,
    encode: ImageEncoder | None = None,
) -> list[GenerationResult]:
    """Img2img at each request's strength: int(steps * strength) UNet calls, counted on `tier`; `on_step`
    as in `text_to_image`; `encode(images)` gives the input images' latents (default: `encode_images`;
    the edge passes one that finds latents prepared beforehand, `engine.edit_preparation`).

    Requests are bucketed by (size, steps, strength, guidance) so that every sample in a batch starts at the
    same timestep. Strength 0 returns the input image unchanged at no cost.
    """
    spec = model.spec

    def resolved(request: Img2ImgRequest) -> tuple[int, int, int, float, float]:
        return (
            request.image.width,
            request.image.height,
            request.num_inference_steps or spec.default_steps,
            spec.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            request.strength,
        )

    def run_group(group: list[Img2ImgRequest]) -> list[GenerationResult]:
        width, height, steps, guidance, strength = resolved(group[0])
        start = time.perf_counter()
        check_prompt_fits(model, [r.prompt for r in group])
        latent_shape(model, width, height)
        # 1. timesteps: skip the first (1 - strength) of the schedule
        scheduler = make_scheduler(model, steps)
        init_steps = min(int(steps * strength), steps)
        timesteps = scheduler.timesteps[steps - init_steps :]
        if init_steps == 0:
            return [
                GenerationResult(r.image.convert("RGB"), r.seed, UnetCalls(), steps, strength, {}, len(group))
                for r in group
            ]
        # 2. encode prompts and images; q_sample x_0 -> x_t at the first kept timestep
        embeddings = encode_prompt(model, [r.prompt for r in group], guidance)
        images = [r.image for r in group]
        init_latents = encode(images) if encode is not None else encode_images(model, images)
        noise = seeded_noise([r.seed for r in group], tuple(init_latents.shape[1:]), model)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(len(group)))
        encode_ms = _ms(start)
        # 3. denoising loop
        unet_start = time.perf_counter()
        latents = denoise(
            model, scheduler, latents, timesteps, embeddings, guidance, _group_callback(on_step, group)
        )
        unet_ms = _ms(unet_start)
        # 4. decode
        vae_start = time.perf_counter()
        images = decode_latents(model, latents)
        timings = {"encode": encode_ms, "unet": unet_ms, "vae": _ms(vae_start), "model_total": _ms(start)}
        calls = UnetCalls(**{tier: init_steps})
        return [
            GenerationResult(image, r.seed, calls, steps, strength, dict(timings), len(group))
            for image, r in zip(images, group, strict=True)
        ]

    return run_in_groups(requests, resolved, run_group)


def preview(
    edge: LoadedModel, requests: Sequence[PreviewRequest], on_step: StepCallback | None = None
) -> list[GenerationResult]:
    """Fast previews on the edge model (its preview step count unless a request sets one)."""
    return text_to_image(edge, requests, tier="edge", on_step=on_step)


def edit(
    edge: LoadedModel,
    requests: Sequence[Img2ImgRequest],
    on_step: StepCallback | None = None,
    encode: ImageEncoder | None = None,
) -> list[GenerationResult]:
    """Round-to-round edit: move a previous preview toward a new prompt at an edit strength, on the edge."""
    return img2img(edge, requests, tier="edge", on_step=on_step, encode=encode)


def refine(
    cloud: LoadedModel, requests: Sequence[Img2ImgRequest], on_step: StepCallback | None = None
) -> list[GenerationResult]:
    """Cloud refinement of previews: img2img at the (predicted) strength and step count."""
    return img2img(cloud, requests, tier="cloud", on_step=on_step)
