"""The three model tiers as in-process objects: a loaded model (or the predictor) behind one `ModelLoop`.

Each tier says, for every request it takes, which kind of batch it joins and what it costs (`job`: the
cost model's `request_cost`, in UNet calls), checks what can be checked before the request joins a batch
(a prompt too long for the tokenizer fails alone, at once), and runs it through its model loop. The
workflows call these objects directly in process (eval, compare, search, tests); the Ray Serve deployments
wrap the same objects, so the batching that is measured is the batching that is served.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from PIL import Image

from diffusionx.engine.edit_preparation import EditPreparation
from diffusionx.engine.model_loop import JobSpec, ModelLoop, ProgressCallback, RunBlocking, _in_thread
from diffusionx.engine.speculation import Claimed, SpeculationStore
from diffusionx.engine.step_warmup import measure_step_time
from diffusionx.models.loading import LoadedModel
from diffusionx.policy.cost import StepDefaults, Work, request_cost
from diffusionx.policy.load import TierSnapshot
from diffusionx.policy.router import CloudLoad
from diffusionx.policy.service_model import ReplicaLoad
from diffusionx.policy.speculation import DEFAULT_MAX_SLOWDOWN, IfRunning, affordable_background
from diffusionx.policy.strength import EditStrengthFunction, heuristic_edit_strength, predict_strength
from diffusionx.requests import (
    EditRequest,
    GenerationResult,
    Img2ImgRequest,
    PreviewRequest,
    TierInfo,
    with_predict_time,
)
from diffusionx.sampling.collaborative import (
    CollaborativeRequest,
    PlanState,
    cloud_phase,
    edge_phase,
)
from diffusionx.sampling.generation import check_prompt_fits, edit, preview, refine, text_to_image
from diffusionx.sampling.step_batching import StepBatcher

TierProgress = Callable[[int, int, str], None]  # (step, total steps, tier)


def _with_tier(on_progress: TierProgress, tier: str, step: int, total: int) -> None:
    on_progress(step, total, tier)


def one_at_a_time(run_blocking: RunBlocking) -> RunBlocking:
    """`run_blocking` for loops whose blocking calls must not overlap: each waits for the one before it
    (first come, first served). One lock per event loop: in-process callers may run the same tiers under
    successive `asyncio.run`s, and an asyncio lock belongs to one loop."""
    turn: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    async def run(function: Callable[..., Any], *args: Any) -> Any:
        nonlocal turn
        loop = asyncio.get_running_loop()
        if turn is None or turn[0] is not loop:
            turn = (loop, asyncio.Lock())
        async with turn[1]:
            return await run_blocking(function, *args)

    return run


def computes_on_host(model: LoadedModel) -> bool:
    """Whether the model's denoising runs on the host's CPU (not a GPU, nor a GPU-timed stand-in)."""
    return model.device.type == "cpu" and not model.spec.gpu_timed


class _Tier:
    tier = ""

    def __init__(
        self,
        max_batch_size: int,
        clock: Callable[[], float] = time.perf_counter,
        run_blocking: RunBlocking = _in_thread,
    ) -> None:
        self.loop = ModelLoop(max_batch_size, clock=clock, run_blocking=run_blocking)

    def job(self, method: str, *args: Any) -> JobSpec:  # pragma: no cover - each tier defines it
        raise NotImplementedError

    def _priced(self, work: Work, request: Any, defaults: StepDefaults) -> JobSpec:
        return JobSpec(work.value, request, request_cost(work, request, defaults).unet_calls)

    async def call(self, method: str, *args: Any, on_progress: TierProgress | None = None) -> Any:
        """Runs one request; `on_progress(step, total, tier)` hears of each of its denoising steps."""
        report: ProgressCallback | None = None
        if on_progress is not None:
            report = functools.partial(_with_tier, on_progress, self.tier)
        return await self.loop.run(*self.job(method, *args), on_progress=report)


class EdgeModel(_Tier):
    """The light model: previews (text-to-image), edits (img2img) and the edge part of EC-Diff / Hybrid.

    Built with `predict_edit`, it also predicts the strength of an edit that names none (`edit_predicted`),
    in its own batching loop beside the model's: the edit then costs one call to this tier instead of one
    to the predictor tier and one here (an edit saves a preview only some of its UNet steps, and a call
    between deployments costs a good part of what it saves). Where the model computes on the host's
    CPU (`computes_on_host`), the two loops' model calls take turns (`one_at_a_time`): side by side in one
    process they would share its GIL, and a prediction made beside a running preview slows that preview
    by about the prediction's own time, while the edit it is for waits for the model anyway. On a GPU, or
    a GPU-timed stand-in that waits a GPU's time, the model's calls hold the GIL little and the two
    overlap as before."""

    tier = "edge"

    def __init__(
        self,
        model: LoadedModel,
        max_batch_size: int = 8,
        edit_steps: int | None = None,
        predict_edit: EditStrengthFunction | None = None,
        clock: Callable[[], float] = time.perf_counter,
        run_blocking: RunBlocking = _in_thread,
        prepare_edits: bool = False,
        prepare_gate: Callable[[], bool] | None = None,
    ):
        if (predict_edit is not None or prepare_edits) and computes_on_host(model):
            run_blocking = one_at_a_time(run_blocking)
        super().__init__(max_batch_size, clock=clock, run_blocking=run_blocking)
        self.model = model
        self.edit_steps = edit_steps or model.spec.default_steps
        self.edit_strengths: PredictorModel | None = None
        if predict_edit is not None:
            self.edit_strengths = PredictorModel(
                max_batch_size=max_batch_size,
                predict_edit=predict_edit,
                clock=clock,
                run_blocking=run_blocking,
            )
        # the work of a session's next edit that does not need its prompt, done while idle (see the module)
        self.preparation: EditPreparation | None = None
        if prepare_edits:
            gate = prepare_gate or (lambda: True)
            self.preparation = EditPreparation(
                model, run_blocking, idle=lambda: self._idle() and gate(), predictor=predict_edit
            )
        encode = self.preparation.encoded.encode if self.preparation is not None else None
        self.loop.register("preview", lambda requests, on_step=None: preview(model, requests, on_step))
        self.loop.register("edit", lambda requests, on_step=None: edit(model, requests, on_step, encode))
        self.loop.register("finish", lambda states: edge_phase(model, states))

    async def info(self) -> TierInfo:
        spec = self.model.spec
        info: TierInfo = {
            "model": spec.name,
            "default_size": spec.default_size,
            "preview_steps": spec.preview_steps,
            "default_steps": spec.default_steps,
            "edit_steps": self.edit_steps,
        }
        if self.edit_strengths is not None:  # the workflows send it edits without a strength
            info["edit_predictor"] = self.edit_strengths.names["edit"]
        if self.preparation is not None:  # the ingress asks it to prepare the edits sessions will send
            info["prepares_edits"] = True
        return info

    def _idle(self) -> bool:
        loops = [self.loop] + ([self.edit_strengths.loop] if self.edit_strengths is not None else [])
        works = [loop.work() for loop in loops]
        return all(not (work.queued_requests or work.running_requests) for work in works)

    async def prepare_edit(self, image: Image.Image) -> None:
        """`image` was answered and its session will probably edit it: prepare that edit while idle (with
        `prepare_edits`; returns at once)."""
        if self.preparation is not None:
            self.preparation.prepare_later(image)

    async def predicted(self, request: EditRequest) -> tuple[Img2ImgRequest, float]:
        """The edit at this tier's predicted strength, and the prediction's milliseconds."""
        if self.edit_strengths is None:
            raise ValueError("this edge tier has no edit predictor: give the edit a strength")
        start = time.perf_counter()
        strength = await self.edit_strengths.predict_edit(
            request.prompt, request.image, request.previous_prompt
        )
        return request.at(float(strength)), round((time.perf_counter() - start) * 1000.0, 3)

    async def edit_predicted(
        self, request: EditRequest, on_progress: TierProgress | None = None
    ) -> GenerationResult:
        edit_request, predict_ms = await self.predicted(request)
        return with_predict_time(await self.edit(edit_request, on_progress=on_progress), predict_ms)

    @property
    def defaults(self) -> StepDefaults:
        spec = self.model.spec
        return StepDefaults(spec.default_steps, spec.preview_steps, self.edit_steps)

    def job(self, method: str, request: Any) -> JobSpec:
        work = Work(method) if method in ("preview", "edit", "finish") else None
        if work is None:
            raise ValueError(f"edge tier has no method {method!r}")
        if work is not Work.FINISH:
            check_prompt_fits(self.model, [request.prompt])  # reject before joining a batch
        if work is Work.EDIT and request.num_inference_steps is None:
            request.num_inference_steps = self.edit_steps
        return self._priced(work, request, self.defaults)

    async def preview(
        self, request: PreviewRequest, on_progress: TierProgress | None = None
    ) -> GenerationResult:
        return await self.call("preview", request, on_progress=on_progress)

    async def edit(
        self, request: Img2ImgRequest, on_progress: TierProgress | None = None
    ) -> GenerationResult:
        return await self.call("edit", request, on_progress=on_progress)

    async def finish(self, state: PlanState | Awaitable[PlanState]) -> GenerationResult:
        """EC-Diff / Hybrid SD, edge part: steps s..N-1 from the cloud's latents, then decode."""
        if inspect.isawaitable(state):
            state = await state
        return await self.call("finish", state)


class CloudModel(_Tier):
    """The heavy model: refinements (step-level batched by default), cloud-only text-to-image and the
    cloud part of EC-Diff / Hybrid SD (`plan`).

    With `warm_up` (the default) a step-batching replica times a few batched steps at start-up
    (`step_warmup`), so the router's service model has a step time before the first refinement."""

    tier = "cloud"

    def __init__(
        self,
        model: LoadedModel,
        max_batch_size: int = 4,
        step_batching: bool = True,
        warm_up: bool = True,
        step_order: str = "sjf",
        background_max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
        speculation_ttl_s: float = 120.0,
        background_gate: Callable[[], bool] | None = None,
        **loop,
    ):
        super().__init__(max_batch_size, **loop)
        self.model = model
        if background_gate is not None:  # e.g. `engine.host_share.HostIdle` on a CPU replica
            self.loop.background_gate = background_gate
            self.loop.monitor.host_idle = background_gate  # reported in the tier's stats
        if step_batching:  # refinements of any strength share UNet batches, joining between steps
            batcher = StepBatcher(model, max_batch_size, "cloud", step_order)
            # speculative (background) samples share a foreground step only as far as the service
            # model's step time says it stays within `background_max_slowdown`
            batcher.background_limit = functools.partial(
                affordable_background,
                max_batch_size=max_batch_size,
                step_s=self.loop.monitor.step_time.predict,
                max_slowdown=background_max_slowdown,
            )
            self.loop.enable_step_batching("refine", batcher)
            if warm_up:
                self.loop.monitor.step_time.seed(measure_step_time(model, max_batch_size))
        # speculative refinements (background work of the step batcher); None without step batching
        self.speculations: SpeculationStore | None = None
        if step_batching:
            self.speculations = SpeculationStore(
                self.loop,
                ttl_s=speculation_ttl_s,
                clock=self.loop.clock,
                unet_calls=self.loop.monitor.speculative_unet_calls,
            )
        else:
            self.loop.register("refine", lambda requests, on_step=None: refine(model, requests, on_step))
        self.loop.register("generate", lambda requests: text_to_image(model, requests, tier="cloud"))
        self.loop.register("plan", lambda requests: cloud_phase(model, requests))

    async def info(self) -> TierInfo:
        spec = self.model.spec
        return {
            "model": spec.name,
            "default_steps": spec.default_steps,
            "default_size": spec.default_size,
            "family": spec.family,
        }

    @property
    def defaults(self) -> StepDefaults:
        return StepDefaults(self.model.spec.default_steps)

    def job(self, method: str, request: Any) -> JobSpec:
        work = Work(method) if method in ("refine", "generate", "plan") else None
        if work is None:
            raise ValueError(f"cloud tier has no method {method!r}")
        check_prompt_fits(self.model, [request.prompt])
        if work is Work.REFINE and request.num_inference_steps is None:
            request.num_inference_steps = self.model.spec.default_steps
        return self._priced(work, request, self.defaults)

    async def refine(
        self, request: Img2ImgRequest, on_progress: TierProgress | None = None
    ) -> GenerationResult:
        return await self.call("refine", request, on_progress=on_progress)

    async def generate(self, request: PreviewRequest) -> GenerationResult:
        return await self.call("generate", request)

    async def plan(self, request: CollaborativeRequest) -> PlanState:
        """EC-Diff / Hybrid SD, cloud part: steps 0..s-1 (with noise approximation); the edge finishes."""
        return await self.call("plan", request)

    def speculate(self, key: str, request: Img2ImgRequest) -> bool:
        """Starts a speculative refinement of `request` under `key` (background work; see
        `engine.speculation`); False when it is already held or the tier does not step-batch."""
        _, request, steps = self.job("refine", request)  # a bad request fails here
        if self.speculations is None or steps == 0:
            return False
        return self.speculations.submit(key, request, steps)

    async def claim_speculation(self, key: str, if_running: IfRunning) -> Claimed:
        """A refine's claim of the speculation of `key`: hit, running (kept), promoted (awaited) or miss."""
        if self.speculations is None:
            return Claimed("miss")
        return await self.speculations.claim(key, if_running)

    def peek_speculation(self, key: str) -> Claimed:
        """The speculation of `key` as it stands, not claimed (`SpeculationStore.peek`)."""
        return Claimed("miss") if self.speculations is None else self.speculations.peek(key)

    def drop_speculation(self, key: str) -> int:
        """Drops a superseded speculation; returns the UNet calls it wasted."""
        return 0 if self.speculations is None else self.speculations.drop(key)

    def load_snapshot(self) -> TierSnapshot:
        """This replica's load report: what the deployment publishes and what the router's service model
        reads (`ReplicaLoad.from_snapshot`)."""
        return self.loop.monitor.snapshot(self.model.spec.default_steps)

    async def load(self) -> CloudLoad:
        """This replica's load, as the router reads it (in process: the tier is this one replica)."""
        return CloudLoad((ReplicaLoad.from_snapshot(self.load_snapshot()),))


StrengthFunction = Callable[[str, Image.Image], float]  # (prompt, preview) -> refine strength


class PredictorModel(_Tier):
    """The strength predictors: how much noise a preview needs before the cloud refines it (`predict`), and
    how strongly a round-to-round edit changes the previous image (`predict_edit`). A predictor with a
    batch method `predict(prompts, images[, previous_prompts])` (the learned ones) runs a batch at once."""

    tier = "predictor"

    def __init__(
        self,
        predict: StrengthFunction = predict_strength,
        max_batch_size: int = 16,
        predict_edit: EditStrengthFunction = heuristic_edit_strength,
        **loop,
    ):
        super().__init__(max_batch_size, **loop)
        self.names = {"refine": _name(predict), "edit": _name(predict_edit)}
        self.loop.register("predict", lambda pairs: _predict_all(predict, pairs))
        self.loop.register("predict_edit", lambda triples: _predict_all(predict_edit, triples))

    async def info(self) -> TierInfo:
        return {"predictor": self.names["refine"], "edit_predictor": self.names["edit"]}

    def job(self, method: str, *args: Any) -> JobSpec:
        if method not in ("predict", "predict_edit"):
            raise ValueError(f"predictor tier has no method {method!r}")
        return JobSpec(method, args, 0)

    async def predict(self, prompt: str, image: Image.Image) -> float:
        return await self.call("predict", prompt, image)

    async def predict_edit(
        self, prompt: str, image: Image.Image, previous_prompt: str | None = None
    ) -> float:
        return await self.call("predict_edit", prompt, image, previous_prompt)


def _name(predict: Callable[..., float]) -> str:
    return getattr(predict, "name", None) or getattr(predict, "__module__", None) or "custom"


def _predict_all(predict: Callable[..., float], calls: Sequence[tuple]) -> list[float]:
    batched = getattr(predict, "predict", None)
    if batched is not None:  # one forward pass for the whole batch
        return list(batched(*(list(column) for column in zip(*calls, strict=True))))
    return [predict(*call) for call in calls]
