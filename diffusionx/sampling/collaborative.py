"""EC-Diff and Hybrid SD: the cloud model plans the first denoising steps, the edge model finishes.

One DDIM schedule, one set of text embeddings (cloud and edge share the text encoder) and one latent space
(they share the VAE), classifier-free guidance applied to each UNet output. For `N` steps `i = 0 .. N-1`
with warm-up `p`, interval `k`, smoothing `a` and switch step `s` (EC-Diff's K-step noise approximation,
as its public reference code does it):

1. `i < p` (warm-up): the cloud UNet predicts eps_i. At `i = p-1` the noise gradient is
   `g = eps_{p-1} - eps_{p-2}` (so `p >= 2`).
2. `p <= i < s`: the cloud UNet runs only when `(i + 1 - p) % (k + 1) == 0`; after such a call
   `g = a * (eps_i - eps_{i-1})`, where eps_{i-1} is whatever the previous step used (often itself
   extrapolated). On every other step no UNet runs: `eps_i = eps_{i-1} + g` (linear extrapolation).
3. `i >= s`: the edge UNet predicts eps_i; the edge model's VAE decodes x_0.

Hybrid SD is the same loop without step 2's skipping (`warmup_steps=None`): cloud for `i < s`, edge after.
With DDIM-50 and `p=7, k=2, a=0.3, s=37` the cloud UNet runs 17 times (steps 0-6, 9, 12, ..., 36), 20 steps
are extrapolated and the edge UNet runs 13 times.

For serving, the sampler splits at the handoff: `cloud_phase` (on the cloud tier) returns one picklable
`PlanState` per request (x_s as a CPU numpy array, the step index and what the edge needs to re-create the
schedule and the embeddings); `edge_phase` (on the edge tier) finishes them. `generate_collaborative` runs
both in one process. All approximation state (eps_{i-1}, g) lives inside one call.

Symbols: x_i -> `latents`, eps_i -> `noise_pred`, eps_{i-1} -> `noise_prev`, g -> `gradient`,
p -> `warmup_steps`, k -> `approx_interval`, a -> `smoothing`, s -> `switch_step`, N -> `num_inference_steps`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from diffusionx.models.loading import LoadedModel
from diffusionx.requests import (
    GenerationResult,
    InvalidRequestError,
    UnetCalls,
    check_guidance,
    check_steps,
    check_text_request,
)
from diffusionx.sampling.generation import (
    check_prompt_fits,
    decode_latents,
    encode_prompt,
    latent_shape,
    make_scheduler,
    predict_noise,
    run_in_groups,
    seeded_noise,
)

StepRole = Literal["cloud", "approximated", "edge"]

# EC-Diff's reference setting for SD-class pairs with DDIM-50 (scaled to other step counts by `ec_diff`).
REFERENCE_STEPS = 50
REFERENCE_WARMUP_STEPS = 7  # p
REFERENCE_APPROX_INTERVAL = 2  # k
REFERENCE_SMOOTHING = 0.3  # a
REFERENCE_SWITCH_STEP = 37  # s


class IncompatibleModelsError(ValueError):
    """A cloud/edge pair that cannot share one latent space and one text embedding."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CollaborationParams:
    """Parameters of one collaborative sampling run (defaults: EC-Diff's reference for DDIM-50).

    `warmup_steps=None` turns the noise approximation off (Hybrid SD: cloud for `i < s`, edge after);
    `approx_interval` and `smoothing` are then unused. `guidance_scale=None` takes the cloud model's.
    """

    num_inference_steps: int = REFERENCE_STEPS  # N
    switch_step: int = REFERENCE_SWITCH_STEP  # s: first step on the edge UNet
    warmup_steps: int | None = REFERENCE_WARMUP_STEPS  # p: cloud steps before extrapolation starts
    approx_interval: int = REFERENCE_APPROX_INTERVAL  # k: extrapolated steps between cloud calls
    smoothing: float = REFERENCE_SMOOTHING  # a: weight of the refreshed gradient
    guidance_scale: float | None = None  # CFG weight w, the same for both UNets

    def __post_init__(self) -> None:
        steps = check_steps(self.num_inference_steps)
        s = self.switch_step
        if not _is_int(s) or not 0 <= s <= steps:
            raise InvalidRequestError(
                f"switch_step={s!r} is not allowed: use an integer from 0 to num_inference_steps ({steps})"
            )
        p = self.warmup_steps
        if p is not None and (not _is_int(p) or not 2 <= p <= s):
            raise InvalidRequestError(
                f"warmup_steps={p!r} is not allowed: with noise approximation use an integer from 2 "
                f"(the first gradient needs two cloud predictions) to switch_step ({s}); "
                "use warmup_steps=None for no approximation"
            )
        k = self.approx_interval
        if not _is_int(k) or k < 0:
            raise InvalidRequestError(f"approx_interval={k!r} is not allowed: use an integer >= 0")
        a = self.smoothing
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0.0 <= float(a) <= 1.0:
            raise InvalidRequestError(f"smoothing={a!r} is not allowed: use a number from 0.0 to 1.0")
        object.__setattr__(self, "smoothing", float(a))
        if self.guidance_scale is not None:
            object.__setattr__(self, "guidance_scale", check_guidance(self.guidance_scale))

    @property
    def approximates(self) -> bool:
        return self.warmup_steps is not None

    @classmethod
    def ec_diff(
        cls,
        num_inference_steps: int = REFERENCE_STEPS,
        *,
        switch_step: int | None = None,
        warmup_steps: int | None = None,
        approx_interval: int | None = None,
        smoothing: float | None = None,
        guidance_scale: float | None = None,
    ) -> CollaborationParams:
        """EC-Diff's parameters; those left None take the reference `p=7, k=2, a=0.3, s=37` at 50 steps
        with p and s scaled to the step count (p >= 2, p <= s).

        k stays 2 at any N: the interval is counted in steps, so it keeps the share of cloud calls (about a
        third) constant. When a default p does not fit before s (tiny N or an early switch) there is nothing
        to extrapolate, and the result is Hybrid SD, which is exactly what EC-Diff computes for s <= p.
        """
        steps = check_steps(num_inference_steps)
        scaled_switch = round(REFERENCE_SWITCH_STEP * steps / REFERENCE_STEPS)
        if warmup_steps is None:
            default_warmup = max(2, round(REFERENCE_WARMUP_STEPS * steps / REFERENCE_STEPS))
            if switch_step is None:
                switch_step = min(steps, max(scaled_switch, default_warmup))
            fits = not _is_int(switch_step) or default_warmup <= switch_step  # a bad s is refused below
            warmup_steps = default_warmup if fits else None
        elif switch_step is None:
            switch_step = (
                min(steps, max(scaled_switch, warmup_steps)) if _is_int(warmup_steps) else scaled_switch
            )
        return cls(
            num_inference_steps=steps,
            switch_step=switch_step,
            warmup_steps=warmup_steps,
            approx_interval=REFERENCE_APPROX_INTERVAL if approx_interval is None else approx_interval,
            smoothing=REFERENCE_SMOOTHING if smoothing is None else smoothing,
            guidance_scale=guidance_scale,
        )

    @classmethod
    def hybrid(
        cls,
        num_inference_steps: int = REFERENCE_STEPS,
        *,
        switch_step: int | None = None,
        guidance_scale: float | None = None,
    ) -> CollaborationParams:
        """Hybrid SD (no approximation). The default switch step is EC-Diff's (s = round(0.74 N)), so the
        two modes differ only by the extrapolated steps."""
        steps = check_steps(num_inference_steps)
        if switch_step is None:
            switch_step = round(REFERENCE_SWITCH_STEP * steps / REFERENCE_STEPS)
        return cls(
            num_inference_steps=steps,
            switch_step=switch_step,
            warmup_steps=None,
            guidance_scale=guidance_scale,
        )


def plan_steps(params: CollaborationParams) -> list[StepRole]:
    """The role of every step i = 0 .. N-1: "cloud" (cloud UNet), "approximated" (eps extrapolated) or
    "edge" (edge UNet). The sampler follows this plan; cost models and the search read it."""
    p, k, s = params.warmup_steps, params.approx_interval, params.switch_step
    roles: list[StepRole] = []
    for i in range(params.num_inference_steps):
        if i >= s:
            roles.append("edge")
        elif p is None or i < p or (i + 1 - p) % (k + 1) == 0:
            roles.append("cloud")
        else:
            roles.append("approximated")
    return roles


def expected_unet_calls(params: CollaborationParams) -> UnetCalls:
    """UNet calls per image that `params` costs (what the sampler reports)."""
    roles = plan_steps(params)
    return UnetCalls(roles.count("cloud"), roles.count("edge"), roles.count("approximated"))


@dataclass
class CollaborativeRequest:
    """Text-to-image by cloud-edge collaboration. Unset sizes take the cloud model's default."""

    prompt: str
    seed: int = 0
    width: int | None = None
    height: int | None = None
    params: CollaborationParams = field(default_factory=CollaborationParams)

    def __post_init__(self) -> None:
        check_text_request(self.prompt, self.seed, self.width, self.height)
        if not isinstance(self.params, CollaborationParams):
            raise InvalidRequestError(f"params must be CollaborationParams, got {type(self.params).__name__}")


@dataclass
class PlanState:
    """The cloud tier's hand-off to the edge tier for one request: x_s after the cloud steps.

    Holds only plain, picklable data (numpy, ints, strings, dataclasses), so it can cross processes; the edge
    re-encodes the prompt with the shared text encoder rather than receiving embeddings.
    """

    prompt: str
    seed: int
    width: int
    height: int
    params: CollaborationParams  # resolved: guidance_scale is set
    step_index: int  # s: the next step to run (the edge's first)
    latents: np.ndarray  # x_s, float32 (C, H/8, W/8)
    scheduler_config: dict  # the plan's DDIM schedule, re-created on the edge
    cloud_name: str  # the cloud model's registry name (for messages)
    family: str  # model family of the cloud model; the edge must be of the same one
    source: str  # checkpoint of the cloud model (identifies a "custom" family)
    text_embedding_dim: int  # cross-attention width of the cloud UNet
    unet_calls: UnetCalls  # what the cloud phase spent
    timings_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


def _check_model(model: LoadedModel, role: str) -> None:
    """Each UNet must read the VAE's latents and the text encoder's embeddings."""
    unet_dim = int(model.unet.config.cross_attention_dim)
    if model.latent_channels != int(model.vae.config.latent_channels):
        raise IncompatibleModelsError(
            f"{role} model '{model.spec.name}': its UNet takes {model.latent_channels} latent channels but "
            f"its VAE makes {model.vae.config.latent_channels}"
        )
    if unet_dim != model.text_embedding_dim:
        raise IncompatibleModelsError(
            f"{role} model '{model.spec.name}': its UNet cross-attends to {unet_dim}-dim text embeddings but "
            f"its text encoder makes {model.text_embedding_dim}-dim ones"
        )


def check_pair(cloud: LoadedModel, edge: LoadedModel) -> None:
    """Refuses a cloud/edge pair that cannot share one latent space, one text embedding and one VAE.

    Raises IncompatibleModelsError naming what differs."""
    pair = f"cloud '{cloud.spec.name}' and edge '{edge.spec.name}'"
    if cloud.latent_channels != edge.latent_channels:
        raise IncompatibleModelsError(
            f"{pair} cannot collaborate: their UNets take {cloud.latent_channels} and {edge.latent_channels} "
            "latent channels; both must denoise the same latent space"
        )
    cloud_dim, edge_dim = (
        int(cloud.unet.config.cross_attention_dim),
        int(edge.unet.config.cross_attention_dim),
    )
    if cloud_dim != edge_dim:
        raise IncompatibleModelsError(
            f"{pair} cannot collaborate: their UNets read {cloud_dim}- and {edge_dim}-dim text embeddings; "
            "both must read the same text encoder's"
        )
    if not cloud.shares_text_and_latents_with(edge):
        raise IncompatibleModelsError(
            f"{pair} cannot collaborate: they do not share one VAE and text encoder. They must be the same "
            f"model family (e.g. SD v1.5 and Tiny-SD; here '{cloud.spec.family}' and '{edge.spec.family}'), "
            "loaded from one checkpoint directory or with load_model(..., share_with=cloud)"
        )
    _check_model(cloud, "cloud")
    _check_model(edge, "edge")


def _check_state_fits(edge: LoadedModel, state: PlanState) -> None:
    """The split version of `check_pair`: the edge tier sees only the cloud's PlanState."""
    pair = f"cloud '{state.cloud_name}' (family {state.family}) and edge '{edge.spec.name}' "
    pair += f"(family {edge.spec.family})"
    if state.latents.shape[0] != edge.latent_channels:
        raise IncompatibleModelsError(
            f"{pair} cannot collaborate: the plan has {state.latents.shape[0]} latent channels, "
            f"the edge UNet takes {edge.latent_channels}"
        )
    edge_dim = int(edge.unet.config.cross_attention_dim)
    if state.text_embedding_dim != edge_dim:
        raise IncompatibleModelsError(
            f"{pair} cannot collaborate: the cloud UNet reads {state.text_embedding_dim}-dim text "
            f"embeddings, the edge UNet {edge_dim}-dim; both must read the same text encoder's"
        )
    if state.family != edge.spec.family or (state.family == "custom" and state.source != edge.spec.source):
        raise IncompatibleModelsError(
            f"{pair} cannot collaborate: they must be the same model family so that they share one VAE and "
            "text encoder (e.g. SD v1.5 and Tiny-SD)"
        )
    _check_model(edge, "edge")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


@torch.no_grad()
def cloud_phase(cloud: LoadedModel, requests: Sequence[CollaborativeRequest]) -> list[PlanState]:
    """Steps `0 .. s-1` on the cloud tier (with EC-Diff's noise approximation when `warmup_steps` is set).

    Requests with the same size and parameters run as one batch; returns one PlanState per request, in order.
    """
    _check_model(cloud, "cloud")
    spec = cloud.spec

    def resolved(request: CollaborativeRequest) -> tuple[int, int, CollaborationParams]:
        params = request.params
        if params.guidance_scale is None:
            params = dataclasses.replace(params, guidance_scale=spec.guidance_scale)
        return (request.width or spec.default_size, request.height or spec.default_size, params)

    def run_group(group: list[CollaborativeRequest]) -> list[PlanState]:
        width, height, params = resolved(group[0])
        guidance = float(params.guidance_scale)  # type: ignore[arg-type]
        start = time.perf_counter()
        # 1. prepare x_T from each request's own seed, on the plan's DDIM schedule
        scheduler = make_scheduler(cloud, params.num_inference_steps)
        latents = seeded_noise([r.seed for r in group], latent_shape(cloud, width, height), cloud)
        latents = latents * scheduler.init_noise_sigma  # (B, C, H/8, W/8)
        roles = plan_steps(params)[: params.switch_step]
        timings: dict[str, float] = {}
        if roles:
            # 2. encode prompts (only when the cloud runs at all)
            check_prompt_fits(cloud, [r.prompt for r in group])
            embeddings = encode_prompt(cloud, [r.prompt for r in group], guidance)
            timings["cloud_text_encoder"] = _ms(start)
        # 3. cloud denoising loop with K-step noise approximation
        unet_start = time.perf_counter()
        p, a = params.warmup_steps, params.smoothing
        noise_prev: torch.Tensor | None = None  # eps_{i-1}
        gradient: torch.Tensor | None = None  # g
        for i, (t, role) in enumerate(zip(scheduler.timesteps, roles, strict=False)):
            if role == "cloud":
                noise_pred = predict_noise(cloud.unet, latents, t, embeddings, guidance)  # eps_i
                if p is not None and i == p - 1:
                    assert noise_prev is not None  # p >= 2: step p-2 ran the cloud UNet
                    gradient = noise_pred - noise_prev  # g = eps_{p-1} - eps_{p-2}
                elif p is not None and i >= p:
                    assert noise_prev is not None
                    gradient = a * (noise_pred - noise_prev)  # g = a (eps_i - eps_{i-1})
            else:
                assert noise_prev is not None and gradient is not None  # approximated only after p
                noise_pred = noise_prev + gradient  # eps_hat_i = eps_{i-1} + g
            latents = scheduler.step(noise_pred, t, latents).prev_sample  # x_i -> x_{i+1}
            noise_prev = noise_pred
        timings["cloud_unet"] = _ms(unet_start)
        timings["cloud_total"] = _ms(start)
        calls = UnetCalls(cloud=roles.count("cloud"), approximated=roles.count("approximated"))
        # 4. hand off x_s as CPU float32 so it can cross processes
        planned = latents.float().cpu().numpy()
        return [
            PlanState(
                prompt=r.prompt,
                seed=r.seed,
                width=width,
                height=height,
                params=params,
                step_index=params.switch_step,
                latents=planned[index],
                scheduler_config=dict(cloud.scheduler_config),
                cloud_name=spec.name,
                family=spec.family,
                source=spec.source,
                text_embedding_dim=int(cloud.unet.config.cross_attention_dim),
                unet_calls=dataclasses.replace(calls),
                timings_ms=dict(timings),
                batch_size=len(group),
            )
            for index, r in enumerate(group)
        ]

    return run_in_groups(requests, resolved, run_group)  # type: ignore[arg-type, return-value]


@torch.no_grad()
def edge_phase(edge: LoadedModel, states: Sequence[PlanState]) -> list[GenerationResult]:
    """Steps `s .. N-1` on the edge UNet, then the edge VAE decodes; one result per state, in order.

    States with the same size, parameters and step index run as one batch (from any cloud batches)."""
    for state in states:
        _check_state_fits(edge, state)

    def key(state: PlanState) -> tuple:
        return (state.width, state.height, state.params, state.step_index, state.family, state.source)

    def run_group(group: list[PlanState]) -> list[GenerationResult]:
        first = group[0]
        params, s = first.params, first.step_index
        guidance = float(params.guidance_scale)  # type: ignore[arg-type]
        start = time.perf_counter()
        # 1. the plan's DDIM schedule on the edge device (one shared scheduler)
        plan_model = dataclasses.replace(edge, scheduler_config=first.scheduler_config)
        scheduler = make_scheduler(plan_model, params.num_inference_steps)
        latents = torch.from_numpy(np.stack([state.latents for state in group]))
        latents = latents.to(device=edge.device, dtype=edge.dtype)  # x_s, (B, C, H/8, W/8)
        timesteps = scheduler.timesteps[s:]
        timings: dict[str, float] = {}
        if len(timesteps):
            # 2. re-encode the prompts with the shared text encoder
            check_prompt_fits(edge, [state.prompt for state in group])
            embeddings = encode_prompt(edge, [state.prompt for state in group], guidance)
            timings["edge_text_encoder"] = _ms(start)
        # 3. edge denoising loop
        unet_start = time.perf_counter()
        for t in timesteps:
            noise_pred = predict_noise(edge.unet, latents, t, embeddings, guidance)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        timings["edge_unet"] = _ms(unet_start)
        # 4. decode x_0 with the edge model's VAE
        vae_start = time.perf_counter()
        images = decode_latents(edge, latents)
        timings["vae"] = _ms(vae_start)
        timings["edge_total"] = _ms(start)
        results = []
        for image, state in zip(images, group, strict=True):
            calls = state.unet_calls + UnetCalls(edge=len(timesteps))
            state_timings = {**state.timings_ms, **timings}
            state_timings["model_total"] = round(
                state_timings.get("cloud_total", 0.0) + timings["edge_total"], 3
            )
            results.append(
                GenerationResult(
                    image, state.seed, calls, params.num_inference_steps, None, state_timings, len(group)
                )
            )
        return results

    return run_in_groups(states, key, run_group)


def generate_collaborative(
    cloud: LoadedModel, edge: LoadedModel, requests: Sequence[CollaborativeRequest]
) -> list[GenerationResult]:
    """EC-Diff (or Hybrid SD) in one process: `cloud_phase` then `edge_phase`, refusing a mismatched pair."""
    check_pair(cloud, edge)
    return edge_phase(edge, cloud_phase(cloud, requests))
