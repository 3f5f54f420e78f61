"""Python client of the DiffusionX HTTP API: sync and async clients, and multi-round sessions.

    with DiffusionXClient("http://127.0.0.1:8000") as client:
        session = client.session(seed=7, width=32, height=32)
        session.preview("a red circle on the left, blue background")
        session.preview("a red circle on the right, blue background", edit_strength=0.6)  # edits round 1
        final = session.finalize()  # refines the last preview with its prompt on the cloud tier
        final.image.save("final.png"); print(final.route, final.strength_used)

`preview` and `refine` (and the session's `preview` and `finalize`) take `on_progress`: a callable that
gets a `ProgressEvent` per denoising step while the server works (server-sent events); with the async
client it may be a coroutine function; with the blocking client it is called from the client's thread.

Every method returns a typed result (`clients.results`) whose images are PIL images; every failure is a
`DiffusionXError` (`clients.errors`).

Every call is retried on what a retry can fix: 5xx answers (a replica died, the server restarted), 503
(overload) and 429 (the API key is over its rate), both after the server's Retry-After, and connection
failures, with exponential backoff and full
jitter (`tenacity`), at most `max_retries` times and never past `deadline_s` (the caller's total budget
for the call, retries included; a Retry-After that would end past it is not waited for). Generation is
idempotent (the seed fixes the image), so a retried request gives the same answer. Other 4xx are never
retried.

The server keeps no session state it cannot lose: a `Session` holds the rounds, sends the previous round's
`preview_id` for an edit or for the final refinement, and when the server answers 404 because the id has
left its cache, resends the image it holds.

One implementation: `AsyncDiffusionXClient` and `AsyncSession` do the work; `DiffusionXClient` and
`Session` run them on a private event loop in a background thread, method for method.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from PIL import Image
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from clients.errors import (
    ConnectionFailed,
    DiffusionXError,
    Overloaded,
    PreviewExpired,
    RateLimited,
    RequestTimeout,
    ServerError,
    error_from_response,
)
from clients.results import (
    GenerateResult,
    HealthResult,
    PreviewResult,
    ProgressEvent,
    RefineResult,
    StatsResult,
    encode_image,
)

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 120.0  # one attempt; CPU replicas under load answer in seconds, not milliseconds
DEFAULT_MAX_RETRIES = 5
DEFAULT_DEADLINE_S = 600.0  # one call, retries included
FIRST_BACKOFF_S = 0.25  # backoff scale without a Retry-After: a random wait in [0, 0.25 * 2**attempt]
MAX_BACKOFF_S = 10.0
ATTEMPT_HEADER = "X-DiffusionX-Attempt"  # 2, 3, ... on retries (the server's diffusionx_retries_total)

ResultT = TypeVar("ResultT", PreviewResult, RefineResult, GenerateResult, StatsResult, HealthResult)
ImageLike = Image.Image | str  # a PIL image or a base64 PNG string
OnProgress = Callable[[ProgressEvent], Any]  # may return an awaitable (async client)
EVENT_STREAM = "text/event-stream"


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


class _ClientBase:
    """Configuration, request bodies and response handling of the client."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout_s: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        deadline_s: float | None = DEFAULT_DEADLINE_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        api_key: str | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries={max_retries} is not allowed: use 0 or more")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline_s={deadline_s} is not allowed: use a positive number or None")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.deadline_s = deadline_s
        self.max_backoff_s = max_backoff_s
        self.api_key = api_key

    @staticmethod
    def _body(arguments: dict[str, Any]) -> dict[str, Any]:
        """The JSON body from a method's arguments (field names are the server's, see diffusionx.api):
        unset fields are not sent, an image goes as base64 PNG."""
        fields = {name: value for name, value in arguments.items() if name != "self"}
        if fields.get("image") is not None:
            fields["image"] = encode_image(fields["image"])
        fields.pop("on_progress", None)
        return _drop_none(**fields)

    # -- responses ----------------------------------------------------------------------------------------

    def _connection_error(self, exc: httpx.TransportError) -> ConnectionFailed:
        if isinstance(exc, httpx.TimeoutException):
            return RequestTimeout(
                f"no answer from the DiffusionX server at {self.base_url} within the client timeout "
                f"({self.timeout_s} s): {type(exc).__name__}"
            )
        return ConnectionFailed(
            f"cannot reach the DiffusionX server at {self.base_url} ({type(exc).__name__}: {exc}); "
            "is it running? Start one with `diffusionx serve`."
        )

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise DiffusionXError(
                f"server answered {response.status_code} with a body that is not JSON: "
                f"{response.text[:200]!r}",
                response.status_code,
            ) from None

    def _retrying(self) -> AsyncRetrying:
        """The retry policy of one call (see the module docstring)."""
        stop: stop_base = stop_after_attempt(self.max_retries + 1)
        if self.deadline_s is not None:
            stop = stop | stop_before_delay(self.deadline_s)
        return AsyncRetrying(
            retry=retry_if_exception_type((ServerError, ConnectionFailed, RateLimited)),
            stop=stop,
            wait=self._wait_s,
            reraise=True,
            before_sleep=_log_retry,
        )

    def _wait_s(self, state: RetryCallState) -> float:
        """The server's Retry-After plus a little jitter (so shed clients do not return in step), else
        exponential backoff with full jitter."""
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, Overloaded | RateLimited) and error.retry_after_s is not None:
            return error.retry_after_s + random.uniform(0.0, min(1.0, 0.25 * error.retry_after_s))
        return wait_random_exponential(multiplier=FIRST_BACKOFF_S, max=self.max_backoff_s)(state)

    def _attempt_timeout(self, started: float) -> float | httpx.Timeout:
        """One attempt's timeout: the client timeout, cut to what is left of the call's deadline."""
        if self.deadline_s is None or not isinstance(self.timeout_s, int | float):
            return self.timeout_s
        return max(0.001, min(self.timeout_s, self.deadline_s - (time.monotonic() - started)))


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait_s = state.next_action.sleep if state.next_action else 0.0
    logger.info("attempt %d failed (%s); retrying in %.2f s", state.attempt_number, error, wait_s)


class AsyncDiffusionXClient(_ClientBase):
    """Asynchronous client. Use as an async context manager, or call `aclose()`.

    `timeout_s` bounds one attempt; `max_retries` and `deadline_s` bound the retries of a call (0 / None:
    no retries / no total deadline); `max_backoff_s` caps one backoff wait. `api_key` is sent as
    `Authorization: Bearer <key>` (servers with API keys on). `transport` replaces the network (tests pass
    an `httpx.MockTransport`).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout_s: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        deadline_s: float | None = DEFAULT_DEADLINE_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(base_url, timeout_s, max_retries, deadline_s, max_backoff_s, api_key)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout_s, transport=transport, limits=limits, headers=headers
        )

    async def __aenter__(self) -> AsyncDiffusionXClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        parse: type[ResultT],
        body: dict[str, Any] | None = None,
        on_progress: OnProgress | None = None,
    ) -> ResultT:
        started = time.monotonic()
        async for attempt in self._retrying():
            with attempt:
                return await self._send(
                    method,
                    path,
                    parse,
                    body,
                    on_progress,
                    attempt.retry_state.attempt_number,
                    self._attempt_timeout(started),
                )
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send(
        self,
        method: str,
        path: str,
        parse: type[ResultT],
        body: dict[str, Any] | None,
        on_progress: OnProgress | None,
        attempt: int,
        timeout: float | httpx.Timeout,
    ) -> ResultT:
        """One attempt: the parsed result, or the typed error of the answer."""
        start = time.perf_counter()
        headers = {ATTEMPT_HEADER: str(attempt)} if attempt > 1 else {}  # counted by the server
        try:
            if on_progress is None:
                response = await self._http.request(method, path, json=body, headers=headers, timeout=timeout)
                payload = self._json(response) if response.is_success else None
            else:
                response, payload = await self._events(method, path, body, headers, on_progress, timeout)
        except httpx.TransportError as exc:
            raise self._connection_error(exc) from exc
        latency_ms = (time.perf_counter() - start) * 1000.0
        if response.is_success:
            assert payload is not None  # a 2xx answer always has its JSON body
            return parse.from_json(payload, latency_ms=latency_ms)
        raise error_from_response(response, preview_id=(body or {}).get("preview_id"))

    async def _events(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str],
        on_progress: OnProgress,
        timeout: float | httpx.Timeout,
    ) -> tuple[httpx.Response, Any]:
        """The request as server-sent events: `on_progress` per step; returns the response and the final
        JSON (None for an error response, whose body is read for the usual error mapping)."""
        headers = {**headers, "Accept": EVENT_STREAM}
        async with self._http.stream(method, path, json=body, headers=headers, timeout=timeout) as response:
            if not response.is_success:
                await response.aread()
                return response, None
            async for event, data in _server_sent_events(response.aiter_lines()):
                if event == "progress":
                    outcome = on_progress(ProgressEvent.from_json(data))
                    if inspect.isawaitable(outcome):
                        await outcome
                elif event == "result":
                    return response, data
                elif event == "error":
                    status = data.get("status")
                    raise DiffusionXError(data.get("error", "the server failed mid-stream"), status, data)
        raise DiffusionXError(f"the event stream of {path} ended without a result", response.status_code)

    async def preview(
        self,
        prompt: str,
        *,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image: ImageLike | None = None,
        preview_id: str | None = None,
        strength: float | None = None,
        previous_prompt: str | None = None,
        session_id: str | None = None,
        on_progress: OnProgress | None = None,
    ) -> PreviewResult:
        """POST /v1/preview: a fast edge-tier image; with `image` or `preview_id`, an edit of that image at
        `strength` or, without one, at the strength the server's edit predictor picks (`previous_prompt`,
        the prompt the image was made for, tells it what changed). `session_id` names the session (its
        newer preview supersedes the older one's speculative refinement on the server).
        `on_progress(ProgressEvent)` is called after each denoising step."""
        return await self._call("POST", "/v1/preview", PreviewResult, self._body(locals()), on_progress)

    async def refine(
        self,
        prompt: str,
        *,
        preview_id: str | None = None,
        image: ImageLike | None = None,
        seed: int = 0,
        strength: float | None = None,
        num_inference_steps: int | None = None,
        latency_target_ms: float | None = None,
        guidance_scale: float | None = None,
        speculation: str | None = None,
        on_progress: OnProgress | None = None,
    ) -> RefineResult:
        """POST /v1/refine: the cloud tier refines a preview; `strength` overrides the predicted strength.
        `speculation="off"` bypasses the server's speculative refinement (the result's `speculative` says
        whether one answered). `on_progress(ProgressEvent)` is called after each denoising step."""
        return await self._call("POST", "/v1/refine", RefineResult, self._body(locals()), on_progress)

    async def generate(
        self, prompt: str, *, seed: int = 0, mode: str = "diffusionx", **params: Any
    ) -> GenerateResult:
        """POST /v1/generate: one-shot text-to-image in `mode` (diffusionx | cloud | edge | hybrid | ec-diff).

        `params` are the mode's fields: width, height, num_inference_steps, guidance_scale, switch_step,
        warmup_steps, approx_interval, smoothing, latency_target_ms (unset ones are not sent).
        """
        body = _drop_none(prompt=prompt, seed=seed, mode=mode, **params)
        return await self._call("POST", "/v1/generate", GenerateResult, body)

    async def health(self) -> HealthResult:
        """GET /v1/health; raises if the server does not answer 2xx."""
        return await self._call("GET", "/v1/health", HealthResult)

    async def stats(self) -> StatsResult:
        """GET /v1/stats: per-tier queue, in-flight work, replicas and recent batch sizes."""
        return await self._call("GET", "/v1/stats", StatsResult)

    def session(
        self,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> AsyncSession:
        """A multi-round session whose methods are coroutines; previews share the seed and size."""
        return AsyncSession(self, seed, width, height, num_inference_steps, guidance_scale)


async def _server_sent_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, Any]]:
    """(event name, JSON data) of each server-sent event (the `event:` and `data:` fields, blank-line
    separated; the name defaults to "message")."""
    event, data = "message", list[str]()
    async for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield event, json.loads("\n".join(data))


# -- sessions ---------------------------------------------------------------------------------------------


@dataclass
class Round:
    """One preview round of a session."""

    index: int  # 0-based
    prompt: str
    edit_strength: float | None  # None: text-to-image; else the strength of the edit of the previous image
    result: PreviewResult
    resent_image: bool = False  # the preview id had expired, so the image itself was sent
    edit_predicted: bool = False  # the server's edit predictor picked `edit_strength`

    @property
    def preview_id(self) -> str:
        return self.result.preview_id

    @property
    def image(self) -> Image.Image:
        return self.result.image

    @property
    def timings_ms(self) -> dict[str, float]:
        return self.result.timings_ms

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the round (no image)."""
        r = self.result
        return {
            "round": self.index + 1,
            "prompt": self.prompt,
            "edit_strength": self.edit_strength,
            "edit_predicted": self.edit_predicted,
            "preview_id": r.preview_id,
            "seed": r.seed,
            "width": r.width,
            "height": r.height,
            "num_inference_steps": r.num_inference_steps,
            "unet_calls": r.unet_calls,
            "timings_ms": r.timings_ms,
            "latency_ms": round(r.latency_ms, 2),
            "resent_image": self.resent_image,
        }


class _SessionBase:
    """State and request shaping shared by `Session` and `AsyncSession`."""

    def __init__(
        self,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> None:
        self.seed = seed
        self.width = width
        self.height = height
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.rounds: list[Round] = []
        self.final: RefineResult | None = None
        self.session_id = uuid.uuid4().hex  # a newer preview supersedes the server's older speculation

    @property
    def last(self) -> Round:
        """The latest round; ValueError before the first preview."""
        if not self.rounds:
            raise ValueError("the session has no preview yet: call preview(prompt) first")
        return self.rounds[-1]

    @property
    def fallbacks(self) -> int:
        """How many rounds had to resend the image because the server no longer knew the preview id."""
        return sum(r.resent_image for r in self.rounds)

    def _preview_kwargs(
        self, edit: bool, edit_strength: float | None, num_inference_steps: int | None
    ) -> dict[str, Any]:
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        kwargs: dict[str, Any] = {
            "seed": self.seed,
            "num_inference_steps": steps,
            "guidance_scale": self.guidance_scale,
            "session_id": self.session_id,
        }
        if not edit:
            kwargs.update(width=self.width, height=self.height)
        else:  # an edit keeps the size of the image it edits; no strength: the server predicts one
            kwargs.update(strength=edit_strength, previous_prompt=self.last.prompt)
        return kwargs

    def _record(self, prompt: str, edit: bool, predicted: bool, result: PreviewResult, resent: bool) -> Round:
        strength = result.strength if edit else None
        round_ = Round(len(self.rounds), prompt, strength, result, resent, edit and predicted)
        self.rounds.append(round_)
        self.final = None  # a new round makes any earlier final image stale
        return round_

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the whole session (rounds and final), without images."""
        final = None
        if self.final is not None:
            f = self.final
            final = {
                "prompt": self.last.prompt,
                "route": f.route,
                "reason": f.reason,
                "strength_predicted": f.strength_predicted,
                "strength_used": f.strength_used,
                "num_inference_steps": f.num_inference_steps,
                "unet_calls": f.unet_calls,
                "load": f.load,
                "timings_ms": f.timings_ms,
                "latency_ms": round(f.latency_ms, 2),
            }
        return {"seed": self.seed, "rounds": [r.summary() for r in self.rounds], "final": final}


class AsyncSession(_SessionBase):
    """Multi-round prompt evolution over an `AsyncDiffusionXClient`.

    `preview(prompt)` starts a fresh image; `preview(prompt, edit_strength=s)` edits the previous round's
    image toward the new prompt (sent by preview id; resent as an image if the id has expired), and
    `preview(prompt, edit=True)` edits it at the strength the server's edit predictor picks.
    `finalize()` refines the last preview with its prompt on the cloud tier.
    """

    def __init__(self, client: AsyncDiffusionXClient, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = client

    async def preview(
        self,
        prompt: str,
        edit_strength: float | None = None,
        *,
        edit: bool = False,
        num_inference_steps: int | None = None,
        on_progress: OnProgress | None = None,
    ) -> Round:
        """Runs one round and returns it (its `result` is the `PreviewResult`). An edit (`edit=True` or an
        `edit_strength`) records the strength used, the predicted one when none was given."""
        edit = edit or edit_strength is not None
        predicted = edit_strength is None
        kwargs = self._preview_kwargs(edit, edit_strength, num_inference_steps)
        kwargs["on_progress"] = on_progress
        if not edit:
            return self._record(prompt, False, False, await self.client.preview(prompt, **kwargs), False)
        previous = self.last
        try:
            result = await self.client.preview(prompt, preview_id=previous.preview_id, **kwargs)
            resent = False
        except PreviewExpired:
            logger.info("preview %s expired on the server; resending its image", previous.preview_id)
            image = previous.result.image_base64 or previous.image
            result = await self.client.preview(prompt, image=image, **kwargs)
            resent = True
        return self._record(prompt, True, predicted, result, resent)

    async def finalize(
        self,
        strength: float | None = None,
        latency_target_ms: float | None = None,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        speculation: str | None = None,
        on_progress: OnProgress | None = None,
    ) -> RefineResult:
        """Refines the last preview with its prompt; `strength` overrides the predicted one;
        `speculation="off"` bypasses the server's speculative refinement."""
        last = self.last
        kwargs: dict[str, Any] = {
            "speculation": speculation,
            "on_progress": on_progress,
            "seed": self.seed,
            "strength": strength,
            "latency_target_ms": latency_target_ms,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
        }
        try:
            self.final = await self.client.refine(last.prompt, preview_id=last.preview_id, **kwargs)
        except PreviewExpired:
            logger.info("preview %s expired on the server; resending its image", last.preview_id)
            image = last.result.image_base64 or last.image
            self.final = await self.client.refine(last.prompt, image=image, **kwargs)
        return self.final


# -- the blocking layer ------------------------------------------------------------------------------------
T = TypeVar("T")


class _Runner:
    """A private event loop in a daemon thread; `run` blocks until a coroutine finished there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="diffusionx-client", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        if not self.loop.is_closed():
            self.loop.close()


def _blocking(method: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """The blocking version of an async method of the wrapped object (same signature and docstring)."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> T:
        return self._runner.run(method(self._async, *args, **kwargs))

    return call


class DiffusionXClient:
    """Synchronous client: `AsyncDiffusionXClient` run on a private event loop. Use as a context manager,
    or call `close()`. Arguments are `AsyncDiffusionXClient`'s (`transport` may be an `httpx.MockTransport`).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        timeout_s: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        **options: Any,
    ):
        self._runner = _Runner()
        self._async = self._runner.run(_make_async_client(base_url, timeout_s, options))
        self.base_url = self._async.base_url

    def __enter__(self) -> DiffusionXClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._runner.loop.is_closed():
            self._runner.run(self._async.aclose())
            self._runner.stop()

    preview = _blocking(AsyncDiffusionXClient.preview)
    refine = _blocking(AsyncDiffusionXClient.refine)
    generate = _blocking(AsyncDiffusionXClient.generate)
    health = _blocking(AsyncDiffusionXClient.health)
    stats = _blocking(AsyncDiffusionXClient.stats)

    def session(self, *args: Any, **kwargs: Any) -> Session:
        """A multi-round session (see `AsyncDiffusionXClient.session` for the arguments)."""
        return Session(self, *args, **kwargs)


async def _make_async_client(base_url: str, timeout_s: Any, options: dict[str, Any]) -> AsyncDiffusionXClient:
    return AsyncDiffusionXClient(base_url, timeout_s, **options)  # its httpx client binds to this loop


class Session:
    """Blocking `AsyncSession` (same methods and state: `rounds`, `final`, `last`, `summary()`, ...)."""

    def __init__(self, client: DiffusionXClient, *args: Any, **kwargs: Any) -> None:
        self.client = client
        self._runner = client._runner
        self._async = AsyncSession(client._async, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # state and plain methods of the async session
        return getattr(self._async, name)

    preview = _blocking(AsyncSession.preview)
    finalize = _blocking(AsyncSession.finalize)
