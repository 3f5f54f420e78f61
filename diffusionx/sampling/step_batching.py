"""Step-level (continuous) batching of img2img refinements whose strengths differ.

`generation.img2img` batches only requests that share (size, steps, strength, guidance), because a batch
there walks one timestep list. Here every sample carries its own position in its own DDIM timestep list, so
a UNet batch can hold samples at different timesteps (different strengths or step counts); samples leave
when their list is done and new ones join between steps. Each sample's image equals the one `refine` gives
for its request alone (see `StepBatcher` for why, and for the caveat on GPUs).

Symbols: x_t -> `latents`, eps -> `noise_pred`, alpha-bar_t -> `alpha_bar_t` (the scheduler's
`alphas_cumprod[t]`), x_0 -> `pred_x0`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler

from diffusionx.models.loading import LoadedModel
from diffusionx.requests import GenerationResult, Img2ImgRequest, UnetCalls
from diffusionx.sampling.generation import (
    check_prompt_fits,
    decode_latents,
    encode_images,
    encode_prompt,
    latent_shape,
    make_scheduler,
    predict_noise,
    seeded_noise,
)

TIERS = ("cloud", "edge")
ORDERS = ("sjf", "fifo")  # step batcher priority: shortest job first (with aging), or arrival order
BATCH_SIZE_HISTORY = 4096  # steps of `recent_batch_sizes` kept (a bounded log for a long-running replica)


@dataclass(eq=False)
class StepBatchedResult(GenerationResult):
    """A `GenerationResult` that also lists the UNet batch size of each step the sample took part in.

    `batch_size` is the largest of them (1 for strength 0, which runs no step).
    """

    step_batch_sizes: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Ticket:
    """Handle of one added request; `result` (or `error`) is set when the request leaves the batcher."""

    request: Img2ImgRequest
    arrival: int  # 0, 1, 2, ... in order of `add`; breaks ties in the schedule
    result: StepBatchedResult | None = None
    error: BaseException | None = None  # the UNet step or the VAE decode failed for this sample
    steps_run: int = 0  # denoising steps this sample has taken so far
    background: bool = False  # speculative work: only slots foreground leaves (see `StepBatcher`)

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass(eq=False)
class _Sample:
    """A request inside the batcher: its x_t and where it is in its own timestep list."""

    ticket: Ticket
    latents: torch.Tensor  # x_t, (1, C, H/f, W/f)
    text_embeddings: torch.Tensor  # (1, L, D), or (2, L, D) as [unconditional; conditional] with guidance
    timesteps: list[int]  # the kept tail of its DDIM schedule, t_1 > t_2 > ...
    step_stride: int  # T // N: DDIM steps from t to t_prev = t - T // N (as `DDIMScheduler.step` does)
    guidance_scale: float
    num_inference_steps: int
    start: float  # perf_counter at `add`
    encode_ms: float
    position: int = 0  # index into `timesteps` of the next step
    waited: int = 0  # steps the batcher ran while this sample was in the pool and not advanced
    unet_ms: float = 0.0
    step_batch_sizes: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.timesteps) - self.position

    @property
    def batch_key(self) -> tuple[tuple[int, ...], float]:
        """Samples batch together only when their x_t shapes and guidance scales agree."""
        return tuple(self.latents.shape), self.guidance_scale

    @property
    def background(self) -> bool:
        return self.ticket.background

    @property
    def priority(self) -> tuple[int, int]:
        """Lower runs first: remaining steps minus steps waited (aging), then earlier arrival."""
        return self.remaining - self.waited, self.ticket.arrival

    @property
    def background_priority(self) -> tuple[int, int]:
        """Among background samples: fewest remaining steps first (closest to a usable result)."""
        return self.remaining, self.ticket.arrival

    @property
    def arrival_priority(self) -> tuple[int, int]:
        """FIFO order (the ordering experiment's baseline): earlier arrival first."""
        return self.ticket.arrival, 0


def share_slots(samples: list[_Sample], slots: int) -> list[_Sample]:
    """Up to `slots` of `samples` (given in priority order), shared among the requests' owners by weight:
    each slot goes to the owner with the fewest slots per weight so far that still has a sample left
    (weighted max-min fairness in whole slots; ties to the owner whose next sample comes first), and
    each owner's samples in priority order. With one owner, or room for all: the first `slots`. Kept
    in priority order."""
    if len(samples) <= slots:
        return samples
    queues: dict[str, deque[int]] = {}
    for index, sample in enumerate(samples):
        queues.setdefault(sample.ticket.request.owner, deque()).append(index)
    if len(queues) == 1:
        return samples[:slots]
    weights = {owner: samples[queue[0]].ticket.request.owner_weight for owner, queue in queues.items()}
    taken = dict.fromkeys(queues, 0)
    chosen: list[int] = []
    while len(chosen) < slots:
        owner = min(
            (owner for owner, queue in queues.items() if queue),
            key=lambda o: ((taken[o] + 1) / weights[o], queues[o][0]),
        )
        chosen.append(queues[owner].popleft())
        taken[owner] += 1
    return [samples[index] for index in sorted(chosen)]


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


class StepBatcher:
    """Continuous batching of DDIM img2img: one UNet batch per step, each sample at its own timestep.

    Algorithm. `add` validates a request exactly as `generation.img2img` does (prompt fits the tokenizer,
    image sides are multiples of the VAE factor), builds its own DDIM schedule (`set_timesteps(N)` and keeps
    the last `int(N * strength)` timesteps), encodes its prompt and image, and noises x_0 to x_t at its first
    kept timestep with noise from its own seed (q_sample). The sample then waits in a pool. Each `step`
    picks up to `max_batch_size` samples from the pool, stacks their x_t, runs the UNet once with a
    per-sample timestep tensor, and applies the DDIM (eta = 0) update to every sample with its own
    alpha-bar_t and alpha-bar_{t_prev}, vectorised over the batch. A sample whose schedule is done leaves:
    it is decoded (with the others that finish in the same step) and its ticket gets a result. A sample
    that joins between two steps is in the next step's choice.

    Which samples advance. Only samples with the same x_t shape and guidance scale can share a UNet batch
    (a "group"). Every sample has the key `remaining steps - waited steps`, where `waited` counts the steps
    the batcher ran while the sample was in the pool and not advanced; ties go to the earlier `add`. A step
    takes the sample with the lowest key, and fills the batch with the lowest-key samples of its group.
    Without waiting this is "fewest remaining steps first", which lets short refinements finish, and free
    their slot, first. With waiting the key is `N_i - (steps run since the sample joined)`, i.e. the step
    at which the sample would finish had it run every step: earliest-deadline-first. The aging bounds the
    wait: once a waiting sample's key reaches 1, no later arrival (whose key is its remaining steps, >= 1)
    can pass it, so it runs after the finitely many samples ahead of it, however many short requests keep
    arriving. When everything fits in one batch (at most `max_batch_size` samples of one group), every
    sample advances every step and the order does not matter. The price of shortest-first under
    overload: a long sample can be left to run its last steps in a small batch (17 UNet calls instead
    of the 14 that keeping it always in the batch would take, for 28 sample-steps at batch size 2);
    under a steady arrival stream the newcomers fill those slots.

    Exactness. Each sample's prompt and image are encoded, and its noise drawn, on its own (as `refine` of
    a single request does); the UNet sees each sample's rows with its own t and text embeddings; and the
    DDIM update performs, element by element, the float32 operations of `DDIMScheduler.step` (tested
    bitwise). So a sample's x_0 is bitwise the one of `refine(model, [request])` whenever the UNet gives a
    row the same output whatever else is in its batch (tested with a row-by-row UNet). Real kernels do not
    quite: on the CPU, Linear (GEMV for one row, GEMM for more) and Conv2d pick a reduction order by batch
    size, so x_0 differs in the last bits (about 1e-5 here, the same as bucketed `refine` batched versus
    alone), which after rounding to 8-bit pixels leaves the images equal in the tests (within 1 level
    asserted). On GPUs (cuBLAS, cuDNN, attention kernels) the same holds, with larger last-bit noise in
    half precision.

    Owners. When a group holds more samples than a batch, its slots are shared among the requests'
    owners (`Img2ImgRequest.owner`, an API key's owner id) by their weights, each owner's samples taken
    by the key above (`share_slots`): a key that floods the tier takes its share of every step, not
    every slot, so another key's refinement starts at the next step instead of behind the flood. With
    one owner (no API keys) this is the order above.

    Background samples (`add(..., background=True)`: speculative refinements nobody waits for yet) take
    only slots foreground samples leave. A step's batch is chosen among foreground samples as above; if
    every foreground sample is in it (none waits), background samples of the same group fill up to
    `background_limit(foreground batch size)` more slots (default: every empty slot; a serving tier sets
    what its service model says a foreground step can afford to share), fewest remaining steps first.
    Without foreground they take `background_limit(0)` slots (at least one). A background sample left
    out is paused where it is: it keeps its x_t and position, does not age, and is not in
    `priorities()` (the foreground load view). `promote` makes it foreground with the key of a new
    arrival of its remaining steps. Its arithmetic is the one of a foreground sample, so pausing and
    promotion leave its pixels unchanged.

    Costs are counted like `img2img`: a sample's `unet_calls` on `tier` is the number of steps it ran
    (`int(N * strength)`); with guidance, the (unconditional, conditional) pair is one call, and
    `max_batch_size` counts samples (the UNet then sees twice as many rows). Not thread-safe: drive it
    from one thread or event loop.
    """

    def __init__(
        self, model: LoadedModel, max_batch_size: int, tier: str = "cloud", order: str = "sjf"
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not allowed: use one of {', '.join(ORDERS)}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} is not allowed: use an integer >= 1")
        if tier not in TIERS:
            raise ValueError(f"tier={tier!r} is not allowed: use one of {', '.join(TIERS)}")
        reference = DDIMScheduler.from_config(model.scheduler_config)
        config = reference.config
        if config.prediction_type != "epsilon":
            raise ValueError(
                f"scheduler prediction_type={config.prediction_type!r} is not supported: StepBatcher "
                "implements the DDIM update for 'epsilon' models only"
            )
        if config.thresholding:
            raise ValueError("scheduler thresholding=True is not supported by StepBatcher")
        self.model = model
        self.max_batch_size = max_batch_size
        self.tier = tier
        self.order = order  # "sjf": fewest remaining steps first, with aging; "fifo": arrival order
        # alpha-bar table (float32, on the CPU, as in the scheduler) and alpha-bar for t_prev < 0
        self._alphas_cumprod: torch.Tensor = reference.alphas_cumprod
        self._final_alpha_cumprod: torch.Tensor = reference.final_alpha_cumprod
        self._num_train_timesteps = int(config.num_train_timesteps)
        self._clip_sample_range: float | None = (
            float(config.clip_sample_range) if config.clip_sample else None
        )
        self._pool: list[_Sample] = []
        self._arrivals = 0
        # background slots a step may add next to `foreground` samples (default: the empty ones)
        self.background_limit: Callable[[int], int] = lambda foreground: self.max_batch_size - foreground
        self.unet_invocations = 0  # UNet forward calls made by `step`
        self.recent_batch_sizes: deque[int] = deque(maxlen=BATCH_SIZE_HISTORY)  # samples per step

    # -- state ---------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Foreground samples in the pool that have not run a step yet (waiting for a slot)."""
        return sum(1 for sample in self._foreground() if sample.position == 0)

    @property
    def active(self) -> int:
        """Foreground samples in the pool that have run at least one step and have steps left."""
        return sum(1 for sample in self._foreground() if sample.position > 0)

    @property
    def idle(self) -> bool:
        return not self._pool

    @property
    def has_foreground(self) -> bool:
        return any(not sample.background for sample in self._pool)

    def background_work(self) -> tuple[int, int]:
        """(samples, remaining steps) of the background samples in the pool."""
        samples = [sample for sample in self._pool if sample.background]
        return len(samples), sum(sample.remaining for sample in samples)

    def priorities(self) -> list[tuple[int, int]]:
        """`(key, remaining steps)` of every pooled foreground sample, in the order `step` picks them."""
        return [(s.priority[0], s.remaining) for s in sorted(self._foreground(), key=self._key)]

    def _foreground(self) -> list[_Sample]:
        return [sample for sample in self._pool if not sample.background]

    def _key(self, sample: _Sample) -> tuple[int, int]:
        return sample.priority if self.order == "sjf" else sample.arrival_priority

    # -- joining -------------------------------------------------------------------------------------

    @torch.no_grad()
    def add(self, request: Img2ImgRequest, background: bool = False) -> Ticket:
        """Validates and prepares `request` (x_t at its first timestep) and puts it in the pool, as
        background work when `background` (see the class docstring).

        Raises `InvalidRequestError` before the request joins. Strength 0 (no steps) is answered at once
        with the input image, as `img2img` does; its ticket is returned done.
        """
        model = self.model
        start = time.perf_counter()
        # 1. check inputs, as img2img does
        steps = request.num_inference_steps or model.spec.default_steps
        guidance = model.spec.guidance_scale if request.guidance_scale is None else request.guidance_scale
        check_prompt_fits(model, [request.prompt])
        latent_shape(model, request.image.width, request.image.height)
        ticket = Ticket(request, self._arrivals, background=background)
        self._arrivals += 1
        # 2. timesteps: skip the first (1 - strength) of this request's own schedule
        scheduler = make_scheduler(model, steps)
        init_steps = min(int(steps * request.strength), steps)
        timesteps = scheduler.timesteps[steps - init_steps :]
        if init_steps == 0:
            ticket.result = StepBatchedResult(
                request.image.convert("RGB"), request.seed, UnetCalls(), steps, request.strength, {}, 1
            )
            return ticket
        # 3. encode prompt and image on their own; q_sample x_0 -> x_t at the first kept timestep
        text_embeddings = encode_prompt(model, [request.prompt], guidance)
        init_latents = encode_images(model, [request.image])  # x_0, (1, C, H/f, W/f)
        noise = seeded_noise([request.seed], tuple(init_latents.shape[1:]), model)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(1))
        self._pool.append(
            _Sample(
                ticket=ticket,
                latents=latents,
                text_embeddings=text_embeddings,
                timesteps=[int(t) for t in timesteps],
                step_stride=self._num_train_timesteps // steps,
                guidance_scale=guidance,
                num_inference_steps=steps,
                start=start,
                encode_ms=_ms(start),
            )
        )
        return ticket

    # -- stepping ------------------------------------------------------------------------------------

    def _select(self) -> list[_Sample]:
        """The samples the next step advances (see the class docstring): foreground lowest key first,
        then background in the slots foreground leaves and can afford to share."""
        foreground = sorted(self._foreground(), key=self._key)
        background = sorted(
            (sample for sample in self._pool if sample.background), key=lambda s: s.background_priority
        )
        if not foreground:
            if not background:
                return []
            key = background[0].batch_key
            room = min(self.max_batch_size, max(1, int(self.background_limit(0))))
            return [sample for sample in background if sample.batch_key == key][:room]
        key = foreground[0].batch_key
        batch = share_slots([sample for sample in foreground if sample.batch_key == key], self.max_batch_size)
        if len(batch) < len(foreground):  # some foreground sample waits: every background sample does too
            return batch
        room = min(self.max_batch_size - len(batch), max(0, int(self.background_limit(len(batch)))))
        return batch + [sample for sample in background if sample.batch_key == key][:room]

    def promote(self, ticket: Ticket) -> bool:
        """Makes a background sample foreground (someone now waits for it); it joins the priority order
        like a new request of its remaining steps. False if it is not a background sample in the pool."""
        for sample in self._pool:
            if sample.ticket is ticket and sample.background:
                ticket.background = False
                sample.waited = 0
                return True
        return False

    def cancel(self, ticket: Ticket) -> bool:
        """Takes the ticket's sample out of the pool (its client is gone); False if it is not in the pool."""
        kept = [sample for sample in self._pool if sample.ticket is not ticket]
        removed = len(kept) < len(self._pool)
        self._pool = kept
        return removed

    def step(self) -> list[Ticket]:
        """Runs one denoising step for the selected samples; returns the tickets that finished in it.

        A failure concerns only the samples it touched: if the UNet call or the update raises, the samples
        of this step leave with `error` set; if the VAE decode of the finished samples raises, those leave
        with `error` set. Every other sample stays in the pool, and `step` itself does not raise.
        """
        batch = self._select()
        if not batch:
            return []
        try:
            finished = self._advance(batch)
        except Exception as error:
            for sample in batch:
                sample.ticket.error = error
            finished = batch
        else:
            # 4. samples whose schedule is done are decoded, and only then leave the pool
            if finished:
                try:
                    self._finish(finished)
                except Exception as error:
                    for sample in finished:
                        sample.ticket.error = error
        leaving = {id(sample) for sample in finished}
        self._pool = [sample for sample in self._pool if id(sample) not in leaving]
        return [sample.ticket for sample in finished]

    @torch.no_grad()
    def _advance(self, batch: list[_Sample]) -> list[_Sample]:
        """One UNet call and DDIM update for `batch`; returns the samples whose schedule is done."""
        model = self.model
        start = time.perf_counter()
        guidance = batch[0].guidance_scale
        # 1. stack x_t (B, C, h, w), per-sample t (B,), and the text embeddings as [uncond; cond]
        latents = torch.cat([sample.latents for sample in batch])
        t = torch.tensor([sample.timesteps[sample.position] for sample in batch], dtype=torch.long)
        t_prev = t - torch.tensor([sample.step_stride for sample in batch], dtype=torch.long)
        if guidance > 1.0:
            text_embeddings = torch.cat(
                [sample.text_embeddings[:1] for sample in batch]
                + [sample.text_embeddings[1:] for sample in batch]
            )
            unet_t = t.repeat(2)  # (2B,): the same t for a sample's unconditional and conditional rows
        else:
            text_embeddings = torch.cat([sample.text_embeddings for sample in batch])
            unet_t = t
        # 2. eps_theta(x_t, t, c), one UNet call for the whole batch
        noise_pred = predict_noise(model.unet, latents, unet_t.to(model.device), text_embeddings, guidance)
        self.unet_invocations += 1
        # 3. DDIM update x_t -> x_{t_prev}, each sample with its own alpha-bars
        latents = self.ddim_update(latents, noise_pred, t, t_prev)
        step_ms = _ms(start)
        self.recent_batch_sizes.append(len(batch))
        advanced = {id(sample) for sample in batch}
        for sample in self._pool:
            if id(sample) not in advanced and not sample.background:  # paused background work does not age
                sample.waited += 1
        for row, sample in enumerate(batch):
            sample.latents = latents[row : row + 1]
            sample.position += 1
            sample.ticket.steps_run = sample.position
            sample.unet_ms += step_ms
            sample.step_batch_sizes.append(len(batch))
        return [sample for sample in batch if sample.remaining == 0]

    def run_until_idle(self) -> int:
        """Steps until the pool is empty; returns the number of steps run."""
        steps = 0
        while self._pool:
            self.step()
            steps += 1
        return steps

    def ddim_update(
        self, latents: torch.Tensor, noise_pred: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor
    ) -> torch.Tensor:
        """x_{t_prev} from (x_t, eps) per sample: `DDIMScheduler.step` with eta = 0, vectorised over B.

        `latents` and `noise_pred` are (B, C, h, w); `t` and `t_prev` are (B,) integer tensors. The
        alpha-bars are computed in float32 on the CPU as the scheduler does, and every tensor operation is
        the scheduler's, in its order: bitwise equal to `step` per sample in float32. In half precision
        each product is taken in float32 and rounded to the latents' dtype; how the scheduler rounds
        there depends on the device's kernels for a tensor times a float32 scalar (on the CPU,
        `scalar * half_tensor` rounds the scalar to half first), so the two may differ in the last
        half-precision bits.
        """
        dtype = latents.dtype

        def per_sample(values: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 1, 1, 1) on the latents' device
            return values.to(latents.device).view(-1, *([1] * (latents.dim() - 1)))

        # alpha-bar_t and alpha-bar_{t_prev}; t_prev < 0 (past the last step) uses final_alpha_cumprod
        alpha_bar_t = self._alphas_cumprod[t]
        alpha_bar_prev = torch.where(
            t_prev >= 0, self._alphas_cumprod[t_prev.clamp(min=0)], self._final_alpha_cumprod
        )
        beta_bar_t = 1 - alpha_bar_t
        # x_0 = (x_t - sqrt(1 - alpha-bar_t) * eps) / sqrt(alpha-bar_t)        (DDIM eq. 12, "predicted x_0")
        scaled_eps = (per_sample(beta_bar_t ** (0.5)) * noise_pred).to(dtype)
        pred_x0 = ((latents - scaled_eps) / per_sample(alpha_bar_t ** (0.5))).to(dtype)
        if self._clip_sample_range is not None:
            pred_x0 = pred_x0.clamp(-self._clip_sample_range, self._clip_sample_range)
        # eta = 0: sigma_t = 0, so the direction to x_t is sqrt(1 - alpha-bar_{t_prev}) * eps
        direction = (per_sample((1 - alpha_bar_prev) ** (0.5)) * noise_pred).to(dtype)
        # x_{t_prev} = sqrt(alpha-bar_{t_prev}) * x_0 + direction
        return (per_sample(alpha_bar_prev ** (0.5)) * pred_x0).to(dtype) + direction

    @torch.no_grad()
    def _finish(self, finished: list[_Sample]) -> None:
        vae_start = time.perf_counter()
        images = decode_latents(self.model, torch.cat([sample.latents for sample in finished]))
        vae_ms = _ms(vae_start)
        for image, sample in zip(images, finished, strict=True):
            request = sample.ticket.request
            timings = {
                "encode": sample.encode_ms,
                "unet": round(sample.unet_ms, 3),
                "vae": vae_ms,
                "model_total": _ms(sample.start),
            }
            sample.ticket.result = StepBatchedResult(
                image,
                request.seed,
                UnetCalls(**{self.tier: len(sample.timesteps)}),
                sample.num_inference_steps,
                request.strength,
                timings,
                max(sample.step_batch_sizes),
                list(sample.step_batch_sizes),
            )


def refine_step_batched(
    model: LoadedModel, requests: Sequence[Img2ImgRequest], max_batch_size: int
) -> list[StepBatchedResult]:
    """Cloud refinement of `requests` with step-level batching; results in request order."""
    batcher = StepBatcher(model, max_batch_size, tier="cloud")
    tickets = [batcher.add(request) for request in requests]
    batcher.run_until_idle()
    for ticket in tickets:
        if ticket.error is not None:
            raise ticket.error
    return [ticket.result for ticket in tickets]  # type: ignore[misc]
