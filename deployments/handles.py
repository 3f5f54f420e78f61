"""The tier deployments as the workflows call them: each DeploymentHandle method awaited, with one retry
when the replica died, and Serve's refusals turned into the errors the ingress answers.

A call whose replica died (Ray raises one of `REPLICA_GONE`, directly or as the cause of a task error) is
sent once more; Serve routes it to a live replica, waiting for the replacement if there is none. Twice
gone is `ReplicaGone` (503, Retry-After). A full tier queue (`BackPressureError`) is `TierOverloaded`
(Serve would otherwise answer a bare 503 without Retry-After). These classes satisfy the Protocols of
`diffusionx.workflows.modes`, as the in-process tiers of `diffusionx.engine.tiers` do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Generator
from typing import Any

from PIL import Image
from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from diffusionx.engine.progress import PROGRESS
from diffusionx.requests import EditRequest, GenerationResult, Img2ImgRequest, PreviewRequest, TierInfo
from diffusionx.sampling.collaborative import CollaborativeRequest, PlanState
from diffusionx.serving.errors import ReplicaGone, TierOverloaded
from diffusionx.workflows.modes import Progress

logger = logging.getLogger(__name__)

# a tier call failed because its replica (or the worker holding its result) is gone
REPLICA_GONE = (
    RayActorError,  # ActorDiedError, ActorUnavailableError
    WorkerCrashedError,
    ObjectLostError,  # OwnerDiedError: e.g. an EC-Diff plan whose cloud replica died
    ReplicaUnavailableError,
    DeploymentUnavailableError,
)


def _on_replica_gone(error: BaseException, attempt: int, retries: int) -> None:
    """After a call's replica died: raises ReplicaGone when no retry is left."""
    if attempt == retries:
        raise ReplicaGone(
            f"a replica died and its replacement is starting ({type(error).__name__})"
        ) from None
    logger.warning("replica gone (%s); retrying the call", type(error).__name__)


async def ask(method: Any, *args: Any, retries: int = 1) -> Any:
    """Calls a tier through its DeploymentHandle method (`handle.preview`, ...), retrying a dead replica."""
    for attempt in range(retries + 1):
        try:
            return await method.remote(*args)
        except BackPressureError as error:
            raise TierOverloaded(str(error)) from None
        except REPLICA_GONE as error:
            _on_replica_gone(error, attempt, retries)
    raise AssertionError("unreachable")


async def ask_stream(method: Any, *args: Any, on_progress: Progress, retries: int = 1) -> Any:
    """Calls a tier's generator method (`preview_stream`, ...) as a Ray Serve stream: hands each progress
    report to `on_progress(step, total, tier)` and returns the result. A stream whose replica died is
    started again on a live replica (generation is deterministic given the seed; its progress restarts
    from step 1). Cancelled (the HTTP client went away), it cancels the stream, and the tier replica
    cancels the job."""
    for attempt in range(retries + 1):
        stream = method.options(stream=True).remote(*args)
        try:
            async for kind, value in stream:
                if kind == PROGRESS:
                    on_progress(*value)
                else:
                    return value
        except BackPressureError as error:
            raise TierOverloaded(str(error)) from None
        except REPLICA_GONE as error:
            _on_replica_gone(error, attempt, retries)
            continue
        except asyncio.CancelledError:
            stream.cancel()
            raise
        raise RuntimeError("the tier's stream ended without a result")
    raise AssertionError("unreachable")


class _HandleTier:
    """A tier deployment as the workflows call it: every method awaits the handle's method."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle  # a DeploymentHandle (untyped in Ray: its methods are resolved by name)

    async def info(self) -> TierInfo:
        info: TierInfo = await ask(self.handle.info)
        return info


class Plan:
    """An EC-Diff / Hybrid cloud plan in flight (a DeploymentResponse), and how to make it again. Awaiting
    it fetches the plan; `EdgeHandle.finish` instead hands the response on unresolved."""

    def __init__(self, handle: Any, request: CollaborativeRequest) -> None:
        self.handle = handle
        self.request = request
        self.response = handle.plan.remote(request)

    def again(self) -> Any:
        self.response = self.handle.plan.remote(self.request)
        return self.response

    def __await__(self) -> Generator[Any, None, PlanState]:
        return self.response.__await__()


class EdgeHandle(_HandleTier):
    async def preview(self, request: PreviewRequest, on_progress: Progress | None = None) -> GenerationResult:
        if on_progress is not None:
            return await ask_stream(self.handle.preview_stream, request, on_progress=on_progress)
        return await ask(self.handle.preview, request)

    async def edit(self, request: Img2ImgRequest, on_progress: Progress | None = None) -> GenerationResult:
        if on_progress is not None:
            return await ask_stream(self.handle.edit_stream, request, on_progress=on_progress)
        return await ask(self.handle.edit, request)

    async def edit_predicted(
        self, request: EditRequest, on_progress: Progress | None = None
    ) -> GenerationResult:
        if on_progress is not None:
            return await ask_stream(self.handle.edit_predicted_stream, request, on_progress=on_progress)
        return await ask(self.handle.edit_predicted, request)

    async def prepare_edit(self, image: Image.Image) -> None:
        await ask(self.handle.prepare_edit, image, retries=0)  # background work: lost with its replica

    async def finish(self, state: Awaitable[PlanState]) -> GenerationResult:
        """Serve resolves a plan's DeploymentResponse for the edge replica, so the latents go from the cloud
        replica to the edge replica without passing through here. If a replica died (the edge's, or the
        cloud's with the latents), plan again and finish once more."""
        if not isinstance(state, Plan):
            return await ask(self.handle.finish, await state)
        try:
            return await ask(self.handle.finish, state.response, retries=0)
        except ReplicaGone:
            logger.warning("EC-Diff plan or finish lost with its replica; planning again")
            return await ask(self.handle.finish, state.again(), retries=0)


class CloudHandle(_HandleTier):
    async def refine(self, request: Img2ImgRequest, on_progress: Progress | None = None) -> GenerationResult:
        if on_progress is not None:
            return await ask_stream(self.handle.refine_stream, request, on_progress=on_progress)
        return await ask(self.handle.refine, request)

    async def generate(self, request: PreviewRequest) -> GenerationResult:
        return await ask(self.handle.generate, request)

    def plan(self, request: CollaborativeRequest) -> Plan:
        return Plan(self.handle, request)  # not awaited: handed to the edge tier as it is


class PredictorHandle(_HandleTier):
    async def predict(self, prompt: str, image: Image.Image) -> float:
        return await ask(self.handle.predict, prompt, image)

    async def predict_edit(self, prompt: str, image: Image.Image, previous_prompt: str | None) -> float:
        return await ask(self.handle.predict_edit, prompt, image, previous_prompt)
