"""What the ingress does with a request once HTTP is done with it: its cost for admission control, the
choice between preview, edit and predicted edit, the preview store, the workflow call, the response, and
the calibration feedback. No Ray and no routes here: `deployments/ingress.py` binds it to FastAPI and the
tiers' DeploymentHandles, and the unit tests drive it with in-process tiers.

Every request is admitted first (`admit`: a refusal is a 503 with Retry-After before any work starts),
then runs inside `AdmissionControl.admit`, which counts its cost as this ingress's queued work until it
ends. The cost is `workflows.cost`'s, in the unit the tiers count their load in. With API keys that
carry weights and rates (`diffusionx.policy.tenants`), admission also refuses a key over its rate (429 with
Retry-After, `RateLimited`) or over its share of a full tier.

Speculation (`tiers.speculation`): once a preview or edit is answered, the workflow's `speculate` runs off
the request's path, and a refine looks up a speculation of its preview (identified by the PNG's digest,
whether named by `preview_id` or sent as `image`) unless its body says `"speculation": "off"`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from PIL import Image

from diffusionx import imaging
from diffusionx.api import (
    GenerateBody,
    GenerateResponse,
    PreviewBody,
    PreviewResponse,
    RefineBody,
    RefineResponse,
)
from diffusionx.policy.admission import AdmissionControl
from diffusionx.policy.cost import StepDefaults
from diffusionx.policy.sessions import SessionTracker, edit_likely
from diffusionx.policy.speculation import preview_digest
from diffusionx.requests import Img2ImgRequest, PreviewRequest, Route
from diffusionx.serving.errors import RateLimited, TierOverloaded
from diffusionx.serving.preview_store import PreviewStore
from diffusionx.workflows import cost, modes
from diffusionx.workflows.cost import TierNeeds
from diffusionx.workflows.modes import GenerateRequest, Progress, Tiers

# a PNG of at most this many pixels encodes in well under a millisecond: inline it is cheaper than the
# hop to a worker thread; larger images go to a thread so that the event loop stays free
INLINE_PNG_PIXELS = 128 * 128

logger = logging.getLogger(__name__)


class RequestObserver(Protocol):
    """Hears of every request served (the ingress's metrics)."""

    def request_done(self, endpoint: str, route: str, seconds: float) -> None: ...

    def routed(self, route: str, strength_predicted: float | None, strength_used: float) -> None: ...


def to_request(body: PreviewBody | GenerateBody) -> PreviewRequest:
    """The library's request for an HTTP body (unset fields: the model's or the mode's defaults): a
    text-to-image request for a preview, a GenerateRequest with the mode's parameters for a generate."""
    if not isinstance(body, GenerateBody):
        return PreviewRequest(
            body.prompt, body.seed, body.width, body.height, body.num_inference_steps, body.guidance_scale
        )
    return GenerateRequest(
        body.prompt,
        body.seed,
        body.width,
        body.height,
        body.num_inference_steps,
        body.guidance_scale,
        switch_step=body.switch_step,
        warmup_steps=body.warmup_steps,
        approx_interval=body.approx_interval,
        smoothing=body.smoothing,
        latency_target_ms=body.latency_target_ms,
    )


async def encode_png(image: Image.Image) -> bytes:
    if image.width * image.height <= INLINE_PNG_PIXELS:
        return imaging.encode_png(image)
    return await asyncio.to_thread(imaging.encode_png, image)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


class Frontend:
    def __init__(
        self,
        tiers: Tiers,
        admission: AdmissionControl,
        previews: PreviewStore,
        observer: RequestObserver,
        sessions: SessionTracker | None = None,
    ) -> None:
        self.tiers = tiers
        self.admission = admission
        self.previews = previews
        self.observer = observer
        self.sessions = sessions  # follows sessions by their preview ids (the cloud's leading indicator)
        self._background: set[asyncio.Task] = set()  # speculations being submitted, off the requests' path

    # -- admission ---------------------------------------------------------------------------------------
    async def step_defaults(self, tier: str) -> StepDefaults:
        """The tier's default step counts (fetched once); a single step while the tier cannot say."""
        try:
            info = await self.tiers.info(tier)
        except TierOverloaded:
            return StepDefaults(1)
        return StepDefaults(
            int(info.get("default_steps", 1)), info.get("preview_steps"), info.get("edit_steps")
        )

    async def preview_needs(self, body: PreviewBody) -> TierNeeds:
        is_edit = body.image is not None or body.preview_id is not None
        edge = await self.step_defaults("edge")
        return cost.preview_needs(
            edge, is_edit=is_edit, num_inference_steps=body.num_inference_steps, strength=body.strength
        )

    async def refine_needs(self, body: RefineBody) -> TierNeeds:
        edge, cloud = await asyncio.gather(self.step_defaults("edge"), self.step_defaults("cloud"))
        return cost.refine_needs(
            edge,
            cloud,
            num_inference_steps=body.num_inference_steps,
            strength=body.strength,
            latency_target_ms=body.latency_target_ms or self.tiers.default_latency_target_ms,
        )

    async def generate_needs(self, body: GenerateBody) -> TierNeeds:
        edge, cloud = await asyncio.gather(self.step_defaults("edge"), self.step_defaults("cloud"))
        target = self.tiers.default_latency_target_ms
        return cost.generate_needs(edge, cloud, body.mode, to_request(body), target)

    def admit(self, needs: TierNeeds, owner: str = "") -> None:
        """Refuses the request at once (TierOverloaded: 503 + Retry-After) when a tier it needs cannot
        start it in time or API key `owner` is over its share of it (RateLimited: 429 + Retry-After when
        the key is over its rate)."""
        refusal = self.admission.decide(needs, owner)
        if refusal is not None:
            error = RateLimited if refusal.status == 429 else TierOverloaded
            raise error(refusal.message, refusal.retry_after_s)

    # -- requests ----------------------------------------------------------------------------------------
    async def png_of(self, image: str | None, preview_id: str | None, owner: str) -> bytes:
        """The PNG a request names: sent inline (base64), or one of `owner`'s previews by id."""
        if image is not None:
            return await asyncio.to_thread(imaging.decode_base64, image)
        assert preview_id is not None  # the body's validator requires one of the two
        return await self.previews.load(preview_id, owner)

    async def image_of(self, image: str | None, preview_id: str | None, owner: str) -> Image.Image:
        """The image a request names (`png_of`), decoded."""
        return await asyncio.to_thread(imaging.decode_png, await self.png_of(image, preview_id, owner))

    def _later(self, work: Coroutine[Any, Any, Any]) -> None:
        """Runs `work` off the request's path; its failure is logged, never raised to a caller."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "work after an answer (speculation, edit preparation) failed: %r", task.exception()
            )

    async def _prepare_edit(self, image: Image.Image) -> None:
        """Asks the edge tier to prepare the edit this preview's session will probably send: background
        work, sent only while admission control finds room for it (`AdmissionControl.background_room`) and
        counted while it runs (`AdmissionControl.holding`)."""
        if not self.admission.background_room("edge"):
            return
        with self.admission.holding("edge"):
            await self.tiers.need_edge("preview").prepare_edit(image)

    async def _speculate(self, body: PreviewBody, png: bytes, session: str) -> None:
        """Speculates the refinement of this preview (the workflow decides whether the policy allows)."""
        image = await asyncio.to_thread(imaging.decode_png, png)
        await modes.speculate(
            self.tiers,
            body.prompt,
            image,
            preview_digest(png),
            session=session,
            seed=body.seed,
            guidance_scale=body.guidance_scale,
        )

    async def preview(
        self, body: PreviewBody, owner: str, needs: TierNeeds, on_progress: Progress | None = None
    ) -> PreviewResponse:
        """A preview, an edit at the given strength, or an edit at the edit predictor's strength."""
        start = time.perf_counter()
        predicted = None
        is_edit = body.image is not None or body.preview_id is not None
        with self.admission.admit(needs, owner):
            if not is_edit:
                result = await modes.preview(self.tiers, to_request(body), on_progress)
            else:
                image = await self.image_of(body.image, body.preview_id, owner)
                if body.strength is not None:
                    request = Img2ImgRequest(
                        body.prompt,
                        image,
                        body.strength,
                        seed=body.seed,
                        num_inference_steps=body.num_inference_steps,
                        guidance_scale=body.guidance_scale,
                    )
                    result = await modes.edit(self.tiers, request, on_progress)
                else:
                    result = await modes.edit_predicted(
                        self.tiers,
                        body.prompt,
                        image,
                        body.previous_prompt,
                        seed=body.seed,
                        num_inference_steps=body.num_inference_steps,
                        guidance_scale=body.guidance_scale,
                        on_progress=on_progress,
                    )
                    predicted = result.strength
        png = await encode_png(result.image)
        preview_id = self.previews.store(png, owner)
        chance = None
        if self.sessions is not None:
            self.sessions.preview(preview_id, body.preview_id)
            chance = self.sessions.finalize_chance(preview_id)
        speculation = self.tiers.speculation
        if speculation is not None and speculation.policy.worth(chance):  # after the answer, off its path
            self._later(self._speculate(body, png, body.session_id or preview_id))
        if edit_likely(chance) and (await self.tiers.info("edge")).get("prepares_edits"):
            self._later(self._prepare_edit(result.image))
        self.observer.request_done("preview", "edit" if is_edit else "edge", time.perf_counter() - start)
        return PreviewResponse(
            preview_id=preview_id,
            image=base64.b64encode(png).decode("ascii"),
            seed=result.seed,
            width=result.image.width,
            height=result.image.height,
            num_inference_steps=result.num_inference_steps,
            strength=result.strength,
            strength_predicted=predicted,
            unet_calls=result.unet_calls.to_dict(),
            timings_ms={**result.timings_ms, "server_total": _ms(start)},
        )

    async def refine(
        self, body: RefineBody, owner: str, needs: TierNeeds, on_progress: Progress | None = None
    ) -> RefineResponse:
        """A refinement at the predicted (or given) strength, routed against the cloud load. Its measured
        latency teaches the router's calibration, unless it fell back to the edge or a speculation
        answered."""
        start = time.perf_counter()
        with self.admission.admit(needs, owner):
            png = await self.png_of(body.image, body.preview_id, owner)
            refined = await modes.refine(
                self.tiers,
                body.prompt,
                lambda: asyncio.to_thread(imaging.decode_png, png),  # decoded unless a speculation answers
                seed=body.seed,
                guidance_scale=body.guidance_scale,
                strength=body.strength,
                num_inference_steps=body.num_inference_steps,
                latency_target_ms=body.latency_target_ms,
                on_progress=on_progress,
                preview=preview_digest(png) if body.speculation == "on" else None,
                owner=owner,
                owner_weight=self.admission.tenants.weight(owner) if self.admission.tenants else 1.0,
            )
        result, decision = refined.result, refined.decision
        if self.sessions is not None:
            self.sessions.finalize(body.preview_id, decision.cloud_steps)  # 0 on the edge fallback
        png = await encode_png(result.image)
        self.observer.routed(decision.route, refined.strength_predicted, decision.strength)
        self.observer.request_done("refine", decision.route, time.perf_counter() - start)
        predicted = decision.route is not Route.EDGE_FALLBACK and refined.speculative not in (
            "hit",
            "promoted",
        )
        if predicted and self.tiers.latency_calibration is not None:
            self.tiers.latency_calibration.observe(decision.uncorrected_latency_ms, _ms(start))
        return RefineResponse(
            image=base64.b64encode(png).decode("ascii"),
            seed=result.seed,
            strength_predicted=refined.strength_predicted,
            strength_used=decision.strength,
            num_inference_steps=decision.num_inference_steps,
            route=decision.route,
            reason=decision.reason,
            # a hit reads no load: nothing was routed
            load={}
            if refined.speculative == "hit"
            else {**refined.load.to_dict(decision.cloud_steps), "latency_scale": decision.latency_scale},
            expected_latency_ms=decision.expected_latency_ms,
            unet_calls=result.unet_calls.to_dict(),
            timings_ms={**refined.timings_ms, "server_total": _ms(start)},
            speculative=refined.speculative,
        )

    async def generate(self, body: GenerateBody, owner: str, needs: TierNeeds) -> GenerateResponse:
        """A one-shot generation in the body's mode."""
        start = time.perf_counter()
        with self.admission.admit(needs, owner):
            generated = await modes.generate(self.tiers, body.mode, to_request(body))
        result = generated.result
        png = await encode_png(result.image)
        self.observer.request_done("generate", body.mode, time.perf_counter() - start)
        return GenerateResponse(
            image=base64.b64encode(png).decode("ascii"),
            mode=body.mode,
            seed=result.seed,
            num_inference_steps=result.num_inference_steps,
            unet_calls=result.unet_calls.to_dict(),
            timings_ms={**result.timings_ms, "server_total": _ms(start)},
            parameters=generated.parameters,
        )
