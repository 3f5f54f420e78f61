"""Server-sent events for the ingress: `POST /v1/preview` and `POST /v1/refine` with
`Accept: text/event-stream` answer with one event per denoising step and then the normal JSON response.

    event: progress
    data: {"step": 3, "total_steps": 8, "tier": "cloud", "elapsed_ms": 412.5}

    event: result
    data: {...exactly the body the request answers without the header...}

The route runs its usual handler with a progress callback (`run(on_progress)`); the response starts once
the first step is done or the handler returned, so a request that fails before any step (bad input, an
unknown preview id, overload) gets its usual 4xx/503 with a JSON body. A failure after the stream started
ends it with `event: error` and `{"error": ..., "status": ...}`. When the HTTP client goes away, Serve
cancels the response generator, which cancels the handler and with it the tier's job.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from diffusionx.engine.progress import PROGRESS, Report, stream_progress

EVENT_STREAM = "text/event-stream"
StepCallback = Callable[[int, int, str], None]  # (step, total steps, tier)


def wants_events(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "")


def format_event(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def event_stream(
    run: Callable[[StepCallback], Awaitable[BaseModel | dict[str, Any]]],
    response_model: type[BaseModel],
    status_of: Callable[[Exception], int],
) -> StreamingResponse:
    """The StreamingResponse of `run(on_progress)`. Its result is serialised through `response_model`, as
    FastAPI serialises the route's plain answer; `status_of` maps a late error to its HTTP status."""
    start = time.perf_counter()

    def wrapped(report: Report) -> Awaitable[BaseModel | dict[str, Any]]:
        def on_progress(step: int, total: int, tier: str) -> None:
            elapsed_ms = round((time.perf_counter() - start) * 1000.0, 3)
            report({"step": step, "total_steps": total, "tier": tier, "elapsed_ms": elapsed_ms})

        return run(on_progress)

    items = stream_progress(wrapped)
    try:
        first = await anext(items)  # an error before the first step is raised here: a plain 4xx/503
    except BaseException:
        await items.aclose()
        raise

    async def body() -> AsyncIterator[str]:
        kind, value = first
        try:
            while True:
                if kind == PROGRESS:
                    yield format_event("progress", value[0])
                else:
                    yield format_event("result", response_model.model_validate(value).model_dump(mode="json"))
                    return
                kind, value = await anext(items)
        except Exception as error:
            yield format_event("error", {"error": str(error), "status": status_of(error)})
        finally:
            await items.aclose()

    return StreamingResponse(
        body(), media_type=EVENT_STREAM, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
