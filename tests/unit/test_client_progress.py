"""The client's `on_progress` over server-sent events, against an in-process fake server (no Ray)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from clients import AsyncDiffusionXClient, DiffusionXClient, ProgressEvent
from clients.errors import DiffusionXError, InvalidRequest
from tests.fakes import URL, FakeServer


class EventServer(FakeServer):
    """FakeServer that answers `Accept: text/event-stream` with one progress event per step, then the
    JSON body it would have answered."""

    steps = 3

    def __call__(self, request: httpx.Request) -> httpx.Response:
        response = super().__call__(request)
        if "text/event-stream" not in request.headers.get("accept", "") or response.status_code != 200:
            return response
        tier = "edge" if request.url.path == "/v1/preview" else "cloud"
        events = [
            f"event: progress\ndata: {json.dumps({'step': i, 'total_steps': self.steps, 'tier': tier, 'elapsed_ms': 5.0 * i})}\n\n"  # noqa: E501
            for i in range(1, self.steps + 1)
        ]
        events.append(f"event: result\ndata: {json.dumps(response.json())}\n\n")
        return httpx.Response(200, text="".join(events), headers={"content-type": "text/event-stream"})


def test_sync_session_reports_every_step_and_returns_the_normal_result() -> None:
    server = EventServer()
    seen: list[ProgressEvent] = []
    with DiffusionXClient(URL, transport=httpx.MockTransport(server)) as client:
        session = client.session(seed=7, width=16, height=16)
        first = session.preview("a red circle", on_progress=seen.append)
        final = session.finalize(on_progress=seen.append)
        plain = client.preview("a red circle", seed=7)  # no callback: a plain JSON request
    assert [(e.step, e.total_steps, e.tier) for e in seen] == [
        (1, 3, "edge"),
        (2, 3, "edge"),
        (3, 3, "edge"),
        (1, 3, "cloud"),
        (2, 3, "cloud"),
        (3, 3, "cloud"),
    ]
    assert seen[-1].fraction == 1.0 and seen[0].elapsed_ms == 5.0
    assert first.result.preview_id == "p0" and final.route == "cloud" and plain.preview_id == "p1"
    assert "on_progress" not in server.requests[0][1]  # the callback is not part of the body


def test_async_client_awaits_coroutine_callbacks_and_maps_errors() -> None:
    async def scenario() -> None:
        seen: list[int] = []

        async def record(event: ProgressEvent) -> None:
            await asyncio.sleep(0)
            seen.append(event.step)

        async with AsyncDiffusionXClient(URL, transport=httpx.MockTransport(EventServer())) as client:
            result = await client.preview("a red circle", seed=1, on_progress=record)
            assert seen == [1, 2, 3] and result.preview_id == "p0"
            # an error before the stream started is the usual JSON error response
            with pytest.raises(InvalidRequest):
                await client.refine("a", preview_id="missing-but-not-an-id-error", on_progress=record)

        def late_failure(request: httpx.Request) -> httpx.Response:
            body = (
                'event: progress\ndata: {"step":1,"total_steps":4,"tier":"cloud","elapsed_ms":1}\n\n'
                'event: error\ndata: {"error":"replica died","status":500}\n\n'
            )
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

        async with AsyncDiffusionXClient(URL, transport=httpx.MockTransport(late_failure)) as client:
            with pytest.raises(DiffusionXError, match="replica died") as caught:
                await client.refine("a", image="aGVsbG8=", on_progress=record)
            assert caught.value.status == 500

    asyncio.run(scenario())


def test_a_retry_carries_the_attempt_header() -> None:
    attempts: list[str | None] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts.append(request.headers.get("x-diffusionx-attempt"))
        if len(attempts) == 1:
            return httpx.Response(503, json={"error": "busy", "status": 503}, headers={"Retry-After": "0"})
        return FakeServer()(request)

    with DiffusionXClient(URL, transport=httpx.MockTransport(flaky), max_retries=1) as client:
        client.preview("a red circle")
    assert attempts == [None, "2"]
