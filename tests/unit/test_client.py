"""The HTTP client against an in-process fake server (httpx.MockTransport): no Ray, no models."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from clients.client import AsyncDiffusionXClient, DiffusionXClient
from clients.errors import (
    ConnectionFailed,
    InvalidRequest,
    Overloaded,
    PreviewExpired,
    RateLimited,
    RequestTimeout,
    ServerError,
    parse_retry_after,
)
from tests.fakes import URL, FakeServer


def test_session_rounds_edit_by_id_and_finalize_last_prompt() -> None:
    server = FakeServer()
    with DiffusionXClient(URL, transport=httpx.MockTransport(server)) as client:
        session = client.session(seed=7, width=16, height=16)
        session.preview("a red circle")
        edited = session.preview("a blue circle", edit_strength=0.6)
        session.preview("a blue square on the left")
        final = session.finalize(latency_target_ms=2000)

    paths = [path for path, _ in server.requests]
    assert paths == ["/v1/preview", "/v1/preview", "/v1/preview", "/v1/refine"]
    # every preview names the session: the newest supersedes the server's older speculation
    session_ids = {body.pop("session_id") for _, body in server.requests[:3]}
    assert session_ids == {session.session_id} and len(session.session_id) == 32
    edit_body = server.requests[1][1]
    assert edit_body == {
        "prompt": "a blue circle",
        "seed": 7,
        "preview_id": "p0",
        "strength": 0.6,
        "previous_prompt": "a red circle",
    }
    assert server.requests[2][1] == {
        "prompt": "a blue square on the left",
        "seed": 7,
        "width": 16,
        "height": 16,
    }
    refine_body = server.requests[3][1]
    assert refine_body == {
        "prompt": "a blue square on the left",
        "seed": 7,
        "preview_id": "p2",
        "latency_target_ms": 2000,
    }
    assert [r.preview_id for r in session.rounds] == ["p0", "p1", "p2"]
    assert edited.edit_strength == 0.6 and not edited.resent_image
    assert isinstance(edited.image, Image.Image) and edited.image.size == (16, 16)
    assert edited.image.getpixel((0, 0)) == (10, 0, 0)
    assert final.route == "cloud" and final.strength_used == pytest.approx(0.42)
    assert final.image.getpixel((3, 3)) == (0, 200, 0)
    assert final.latency_ms > 0
    summary = session.summary()
    assert [r["prompt"] for r in summary["rounds"]][-1] == "a blue square on the left"
    assert summary["final"]["prompt"] == "a blue square on the left"
    assert summary["rounds"][0]["timings_ms"]["model_total"] == 12.5


def test_session_edit_without_strength_asks_the_edit_predictor() -> None:
    server = FakeServer()
    with DiffusionXClient(URL, transport=httpx.MockTransport(server)) as client:
        session = client.session(seed=3)
        session.preview("a red circle")
        edited = session.preview("a red square", edit=True)

    assert server.requests[1][1] == {
        "prompt": "a red square",
        "seed": 3,
        "preview_id": "p0",
        "previous_prompt": "a red circle",
        "session_id": session.session_id,
    }
    assert edited.edit_strength == 0.75 and edited.edit_predicted
    assert session.summary()["rounds"][1]["edit_predicted"] is True
    assert session.rounds[0].edit_strength is None and not session.rounds[0].edit_predicted


def test_expired_preview_id_resends_the_image_it_holds() -> None:
    server = FakeServer()
    with DiffusionXClient(URL, transport=httpx.MockTransport(server)) as client:
        session = client.session(seed=3, width=16, height=16)
        first = session.preview("a red circle")
        server.forget_ids = True  # the server's cache evicted every id
        edited = session.preview("a green circle", edit_strength=0.5)
        session.finalize()

    sent = [(path, sorted(body)) for path, body in server.requests]
    assert sent == [
        ("/v1/preview", ["height", "prompt", "seed", "session_id", "width"]),
        ("/v1/preview", ["preview_id", "previous_prompt", "prompt", "seed", "session_id", "strength"]),  # 404
        ("/v1/preview", ["image", "previous_prompt", "prompt", "seed", "session_id", "strength"]),
        ("/v1/refine", ["preview_id", "prompt", "seed"]),  # 404
        ("/v1/refine", ["image", "prompt", "seed"]),
    ]
    assert server.requests[2][1]["image"] == first.result.image_base64  # exactly the bytes it got
    assert server.requests[4][1]["image"] == edited.result.image_base64
    assert edited.resent_image and session.fallbacks == 1


def test_session_needs_a_preview_before_an_edit_or_finalize() -> None:
    with DiffusionXClient(URL, transport=httpx.MockTransport(FakeServer())) as client:
        session = client.session()
        with pytest.raises(ValueError, match="preview"):
            session.finalize()
        with pytest.raises(ValueError, match="preview"):
            session.preview("a red circle", edit_strength=0.5)


def _answer(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(status, json=body, headers=headers))


def test_422_becomes_invalid_request_with_the_server_message() -> None:
    message = "width: width=30 is not allowed: use a multiple of 8 between 8 and 1024"
    with (
        DiffusionXClient(URL, transport=_answer(422, {"error": message, "status": 422})) as client,
        pytest.raises(InvalidRequest) as info,
    ):
        client.preview("a red circle", width=30)
    assert info.value.status == 422 and info.value.message == message
    assert not isinstance(info.value, PreviewExpired)
    assert str(info.value) == f"[422] {message}"


def test_fastapi_detail_list_is_readable() -> None:
    detail = [{"loc": ["body", "seed"], "msg": "Input should be greater than or equal to 0"}]
    with (
        DiffusionXClient(URL, transport=_answer(422, {"detail": detail})) as client,
        pytest.raises(InvalidRequest, match=r"seed: Input should be greater"),
    ):
        client.generate("a red circle", seed=-1)


def test_404_is_preview_expired_only_when_a_preview_id_was_sent() -> None:
    transport = _answer(404, {"error": "preview_id 'p9' is unknown or has expired", "status": 404})
    with DiffusionXClient(URL, transport=transport) as client:
        with pytest.raises(PreviewExpired) as info:
            client.refine("a red circle", preview_id="p9")
        with pytest.raises(InvalidRequest) as other:
            client.refine("a red circle", image=Image.new("RGB", (8, 8)))
    assert info.value.preview_id == "p9" and "expired" in info.value.message
    assert type(other.value) is InvalidRequest


def test_503_becomes_overloaded_with_retry_after_and_500_server_error() -> None:
    body = {"error": "overloaded, retry later", "status": 503}
    with (
        DiffusionXClient(URL, transport=_answer(503, body, {"Retry-After": "2.5"}), max_retries=0) as client,
        pytest.raises(Overloaded) as info,
    ):
        client.preview("a red circle")
    assert info.value.retry_after_s == 2.5 and info.value.retry_after == 2.5 and info.value.status == 503
    with (
        DiffusionXClient(
            URL, transport=_answer(500, {"error": "boom", "status": 500}), max_retries=0
        ) as client,
        pytest.raises(ServerError, match="boom") as failed,
    ):
        client.stats()
    assert not isinstance(failed.value, Overloaded)


def test_retry_on_503_honours_retry_after_and_is_bounded() -> None:
    calls: list[float] = []
    server = FakeServer()

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(time.perf_counter())
        if len(calls) <= 2:
            return httpx.Response(503, json={"error": "busy", "status": 503}, headers={"Retry-After": "0.05"})
        return server(request)

    with DiffusionXClient(URL, transport=httpx.MockTransport(flaky), max_retries=2) as client:
        assert client.preview("a red circle").preview_id == "p0"
    assert len(calls) == 3 and calls[1] - calls[0] >= 0.05
    calls.clear()
    with (
        DiffusionXClient(URL, transport=httpx.MockTransport(flaky), max_retries=1) as client,
        pytest.raises(Overloaded),
    ):
        client.preview("a red circle")
    assert len(calls) == 2
    # a Retry-After that would end past the call's deadline is not waited for
    slow = _answer(503, {"error": "busy", "status": 503}, {"Retry-After": "60"})
    with DiffusionXClient(URL, transport=slow, max_retries=3, deadline_s=1.0) as client:
        started = time.perf_counter()
        with pytest.raises(Overloaded):
            client.preview("a red circle")
        assert time.perf_counter() - started < 1.0


def test_429_is_retried_after_its_retry_after_like_503() -> None:
    calls: list[float] = []
    server = FakeServer()

    def limited(request: httpx.Request) -> httpx.Response:
        calls.append(time.perf_counter())
        if len(calls) == 1:
            return httpx.Response(429, json={"error": "rate", "status": 429}, headers={"Retry-After": "0.05"})
        return server(request)

    with DiffusionXClient(URL, transport=httpx.MockTransport(limited), max_retries=1) as client:
        assert client.preview("a red circle").preview_id == "p0"
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.05
    rate = _answer(429, {"error": "rate limited", "status": 429}, {"Retry-After": "3"})
    with DiffusionXClient(URL, transport=rate, max_retries=0) as client, pytest.raises(RateLimited) as info:
        client.preview("a red circle")
    assert info.value.status == 429 and info.value.retry_after_s == 3.0


def test_5xx_and_connection_errors_are_retried_with_jittered_backoff_not_4xx() -> None:
    server = FakeServer()
    answers = iter(
        [
            httpx.Response(500, json={"error": "replica died", "status": 500}),
            httpx.ConnectError("connection refused"),
            httpx.Response(502, text="bad gateway"),
        ]
    )
    calls: list[float] = []

    def failing_then_ok(request: httpx.Request) -> httpx.Response:
        calls.append(time.perf_counter())
        answer = next(answers, None)
        if isinstance(answer, Exception):
            raise answer
        return answer if answer is not None else server(request)

    client = AsyncDiffusionXClient(URL, transport=httpx.MockTransport(failing_then_ok), max_backoff_s=0.05)
    result = asyncio.run(_close_after(client, client.preview("a red circle")))
    assert result.preview_id == "p0" and len(calls) == 4
    assert all(b - a <= 0.5 for a, b in itertools.pairwise(calls))  # waits capped at 0.05 s
    # 4xx is the caller's mistake: never retried
    calls.clear()
    bad = _answer(422, {"error": "prompt: too long", "status": 422})

    def count(request: httpx.Request) -> httpx.Response:
        calls.append(0.0)
        return bad.handle_request(request)

    with DiffusionXClient(URL, transport=httpx.MockTransport(count)) as sync, pytest.raises(InvalidRequest):
        sync.preview("a red circle")
    assert len(calls) == 1


def test_the_deadline_bounds_every_call_retries_included() -> None:
    calls: list[float] = []

    def always_500(request: httpx.Request) -> httpx.Response:
        calls.append(time.perf_counter())
        return httpx.Response(500, json={"error": "down", "status": 500})

    with DiffusionXClient(
        URL, transport=httpx.MockTransport(always_500), max_retries=1000, deadline_s=0.6, max_backoff_s=0.2
    ) as client:
        started = time.perf_counter()
        with pytest.raises(ServerError, match="down"):
            client.stats()
        elapsed = time.perf_counter() - started
    assert elapsed < 0.6 + 0.2 and len(calls) >= 2  # retried, then stopped by the deadline, not the count
    with pytest.raises(ValueError, match="max_retries"):
        AsyncDiffusionXClient(URL, max_retries=-1)


async def _close_after(client: AsyncDiffusionXClient, call: Any) -> Any:
    async with client:
        return await call


def test_connection_failures_are_wrapped() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with (
        DiffusionXClient(URL, transport=httpx.MockTransport(refuse), max_retries=0) as client,
        pytest.raises(ConnectionFailed, match=r"cannot reach the DiffusionX server at http://diffusionx"),
    ):
        client.health()
    with (
        DiffusionXClient(URL, timeout_s=3.0, transport=httpx.MockTransport(hang), max_retries=0) as client,
        pytest.raises(RequestTimeout, match=r"within the client timeout \(3.0 s\)"),
    ):
        client.health()


def test_parse_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert parse_retry_after(date, now_s=now) == pytest.approx(10.0)
    assert parse_retry_after(email.utils.formatdate(now - 10, usegmt=True), now_s=now) == 0.0


def test_stats_and_health_are_typed() -> None:
    stats = {
        "tiers": {
            "edge": {
                "queued": 1,
                "in_flight": 4,
                "queued_steps": 40,
                "replicas": 2,
                "recent_batch_sizes": [4, 2],
                "seconds_per_step": 0.01,
                "requests_served": 9,
            }
        },
        "preview_cache": {"size": 3, "capacity": 1024},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/stats":
            return httpx.Response(200, json=stats)
        return httpx.Response(200, json={"status": "ok", "edge": {"model": "tiny-random-edge"}})

    with DiffusionXClient(URL, transport=httpx.MockTransport(handler)) as client:
        result = client.stats()
        health = client.health()
    assert result.tiers["edge"].recent_batch_sizes == [4, 2] and result.tiers["edge"].replicas == 2
    assert result.preview_cache["capacity"] == 1024
    assert health.ok and health.details["edge"]["model"] == "tiny-random-edge"


def test_async_session_falls_back_and_maps_errors() -> None:
    server = FakeServer()

    async def run() -> None:
        async with AsyncDiffusionXClient(URL, transport=httpx.MockTransport(server)) as client:
            session = client.session(seed=5, width=16, height=16)
            first = await session.preview("a red circle")
            server.forget_ids = True
            edited = await session.preview("a red circle on the left", edit_strength=0.7)
            final = await session.finalize(strength=0.3)
            assert edited.resent_image and server.requests[2][1]["image"] == first.result.image_base64
            assert final.strength_used == pytest.approx(0.3) and server.requests[-1][1]["strength"] == 0.3
            # unknown route -> 404 without a preview id -> InvalidRequest
            with pytest.raises(InvalidRequest, match="no route"):
                await client.generate("a red circle", mode="cloud")
        overloaded = _answer(503, {"error": "busy", "status": 503}, {"Retry-After": "1"})
        async with AsyncDiffusionXClient(URL, transport=overloaded, max_retries=0) as client:
            with pytest.raises(Overloaded) as info:
                await client.preview("a red circle")
            assert info.value.retry_after_s == 1.0

    asyncio.run(run())
    assert [path for path, _ in server.requests].count("/v1/refine") == 2


def test_importing_the_client_loads_neither_torch_nor_ray() -> None:
    code = "import sys, clients.client; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
