"""The HTTP boundary in process (no Ray): hostile bodies and images, API keys, admission control with a
fake clock."""

from __future__ import annotations

import asyncio
import hmac
import io
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from PIL import Image

from diffusionx.engine.monitor import TierLoad, TierMonitor, TierSnapshot, merge_snapshots
from diffusionx.imaging import claimed_png_size, decode_png
from diffusionx.policy.admission import BACKGROUND_CALLS, AdmissionControl
from diffusionx.requests import InvalidRequestError
from diffusionx.serving import guard as guard_module
from diffusionx.serving.guard import Guard, GuardConfig, check_json, load_api_keys, owner_of
from tests.fakes import FakeClock, png_claiming


# -- images -------------------------------------------------------------------------------------------------
def test_decompression_bombs_are_refused_from_the_header_before_decoding():
    bomb = png_claiming(30000, 30000)
    assert claimed_png_size(bomb) == (30000, 30000)
    with pytest.raises(InvalidRequestError, match="30000x30000; each side must be at most 1024"):
        decode_png(bomb)
    with pytest.raises(InvalidRequestError, match="2000x16"):
        decode_png(png_claiming(2000, 16))
    assert claimed_png_size(b"GIF89a" + b"\0" * 30) is None


def test_pillows_own_bomb_check_answers_4xx(monkeypatch):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="JPEG")
    for limit in (200, 100):  # 256 pixels: over the limit (warning) and over twice it (error)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(InvalidRequestError, match="decompression bomb"):
            decode_png(buffer.getvalue())


def test_formats_other_than_png_jpeg_webp_are_refused():
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="GIF")
    with pytest.raises(InvalidRequestError, match="JPEG and WebP are accepted"):
        decode_png(buffer.getvalue())


# -- bodies and keys ----------------------------------------------------------------------------------------
def echo_app(config: GuardConfig) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/preview")
    async def preview(request: Request) -> dict[str, Any]:
        return {"owner": request.state.owner, "body": await request.json()}

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict[str, str]:
        return {"owner": request.state.owner}

    app.add_middleware(Guard, config=lambda: config)
    return app


def call(config: GuardConfig, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=echo_app(config))
        async with httpx.AsyncClient(transport=transport, base_url="http://guard.test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"prompt=a+cat", "not valid JSON"),
        (b'{"prompt": "a", "seed": NaN}', "NaN and Infinity are not allowed"),
        (b'{"prompt": "a", "guidance_scale": Infinity}', "NaN and Infinity are not allowed"),
        (b'{"prompt": "a", "guidance_scale": -Infinity}', "NaN and Infinity are not allowed"),
    ],
)
def test_bodies_that_are_not_utf8_json_get_422_with_the_api_error_body(content, message):
    response = call(GuardConfig(), "POST", "/v1/preview", content=content)
    assert response.status_code == 422 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "status"} and body["status"] == 422 and message in body["error"]


def test_oversize_bodies_get_413_before_parsing():
    config = GuardConfig(max_body_bytes=1024)
    declared = call(config, "POST", "/v1/preview", content=b"{" + b" " * 2000 + b"}")
    assert declared.status_code == 413 and "at most 1024 bytes" in declared.json()["error"]

    async def chunks():  # no Content-Length: the limit is checked while reading
        for _ in range(10):
            yield b" " * 200

    streamed = call(config, "POST", "/v1/preview", content=chunks())
    assert streamed.status_code == 413 and declared.json()["status"] == 413
    ok = call(config, "POST", "/v1/preview", json={"prompt": "a cat"})
    assert ok.status_code == 200 and ok.json() == {"owner": "", "body": {"prompt": "a cat"}}
    assert check_json(b'{"a": 1.5e300}') is None


def test_api_keys_are_off_by_default_and_then_required_except_for_health(tmp_path, monkeypatch):
    assert call(GuardConfig(), "GET", "/v1/stats").status_code == 200
    keys_file = tmp_path / "keys"
    keys_file.write_text("# one key a line\nkey-two  # ops\n\n")
    keys = load_api_keys(["key-one"], environ={"DIFFUSIONX_API_KEYS_FILE": str(keys_file)})
    assert [key.key for key in keys] == ["key-one", "key-two"]
    config = GuardConfig(keys)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-one"}):
        response = call(config, "GET", "/v1/stats", headers=headers)
        assert response.status_code == 401 and "Authorization: Bearer <key>" in response.json()["error"]
    assert call(config, "GET", "/v1/health").status_code == 200
    one = call(config, "GET", "/v1/stats", headers={"Authorization": "Bearer key-one"}).json()["owner"]
    two = call(config, "GET", "/v1/stats", headers={"Authorization": "bearer key-two"}).json()["owner"]
    assert one == owner_of("key-one") != two == owner_of("key-two") and "key" not in one


def test_every_key_is_compared_in_constant_time_for_missing_and_wrong_keys(monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard_module.hmac, "compare_digest", counting)
    config = GuardConfig(["k1", "k2", "k3"])
    for header in (None, "Bearer wrong", "Bearer k1"):  # missing, wrong, and a match on the first key
        compared.clear()
        config.authenticate(header)
        assert len(compared) == 3  # all keys, no early exit


# -- admission control ---------------------------------------------------------------------------
def test_admission_refuses_at_once_with_retry_after_from_the_drain_time():
    clock = FakeClock()
    admission = AdmissionControl({"cloud": 4, "edge": 8}, max_wait_s=2.0, view_max_age_s=5.0, clock=clock)
    # no measured step time yet: nothing is refused here (the tier's bounded queue is the backstop)
    assert admission.decide({"cloud": 20}) is None
    # 2 replicas x 4 per batch, 0.1 s a step: 80 queued request-steps drain in 1 s -> admit
    admission.update({"cloud": TierLoad(queued_steps=80, replicas=2, step_time_s=(0.1, 0.0))})
    assert admission.wait_s("cloud") == pytest.approx(1.0) and admission.decide({"cloud": 20}) is None
    # 300 steps: 3.75 s > 2 s -> refused, Retry-After = ceil(3.75 - 2) = 2 s
    admission.update({"cloud": TierLoad(queued_steps=300, replicas=2, step_time_s=(0.1, 0.0))})
    refusal = admission.decide({"edge": 5, "cloud": 20})
    assert refusal is not None and refusal.tier == "cloud" and refusal.retry_after_s == 2
    assert "cloud tier" in refusal.message and "retry in 2 s" in refusal.message
    assert admission.decide({"edge": 5}) is None  # the edge tier is not loaded
    # a view older than view_max_age_s is not trusted
    clock.now += 6.0
    assert admission.decide({"cloud": 20}) is None
    assert admission.refused == 1


def test_admission_counts_its_own_admitted_work_while_reports_lag_a_burst():
    clock = FakeClock()
    admission = AdmissionControl({"cloud": 1}, max_wait_s=1.0, clock=clock)
    admission.update({"cloud": TierLoad(queued_steps=0, replicas=1, step_time_s=(0.1, 0.0))})
    decisions = []
    with admission.admit({"cloud": 8}), admission.admit({"cloud": 8}):  # 16 steps in flight: 1.6 s
        decisions.append(admission.decide({"cloud": 8}))
    assert decisions[0] is not None and decisions[0].retry_after_s == 1
    assert admission.own_steps == {"cloud": 0}  # released: the counters never grow
    assert admission.decide({"cloud": 8}) is None


def test_admission_drains_at_the_fitted_step_time_of_a_full_batch():
    clock = FakeClock()
    admission = AdmissionControl({"cloud": 8}, max_wait_s=2.0, clock=clock)
    # measured on lone requests: 0.02 s a step; the fit says a batch of 8 takes 0.02 + 0.01 * 8 = 0.1 s
    view = TierLoad(queued_steps=200, replicas=1, seconds_per_step=0.02, step_time_s=(0.02, 0.01))
    admission.update({"cloud": view})
    assert admission.wait_s("cloud") == pytest.approx(200 * 0.1 / 8)  # 2.5 s, not 0.5 s
    refusal = admission.decide({"cloud": 10})
    assert refusal is not None and refusal.retry_after_s == 1
    admission.update({"cloud": replace(view, step_time_s=None)})  # not measured: no time bound
    assert admission.wait_s("cloud") == 0.0


def replica_snapshot(max_ongoing: int, max_queued: int) -> TierSnapshot:
    monitor = TierMonitor()
    monitor.max_ongoing_requests, monitor.max_queued_requests = max_ongoing, max_queued
    return monitor.snapshot()


def test_admission_refuses_at_the_door_before_the_tiers_bounded_queue_is_full():
    clock = FakeClock()
    admission = AdmissionControl({"cloud": 8}, max_wait_s=10.0, clock=clock)
    # 2 replicas x max_ongoing 4 + a caller queue of 2: the 11th request would get Serve's BackPressureError
    view = merge_snapshots([replica_snapshot(4, 2), replica_snapshot(4, 2)])
    assert view.request_capacity == 10
    admission.update({"cloud": replace(view, step_time_s=(0.1, 0.0))})
    with ExitStack() as admitted:
        for _ in range(10):  # 10 requests of 10 steps: 100 steps drain in 100 * 0.1 / (2 * 8) = 0.6 s
            assert admission.decide({"cloud": 10}) is None
            admitted.enter_context(admission.admit({"cloud": 10}))
        refusal = admission.decide({"cloud": 10})
        assert refusal is not None and refusal.tier == "cloud" and refusal.retry_after_s == 1
    assert admission.decide({"cloud": 10}) is None  # the requests finished: room again
    assert admission.own_requests == {"cloud": 0}
    # an unbounded caller queue (-1), or a replica that does not say (outside Serve): no request bound
    assert merge_snapshots([replica_snapshot(4, -1)]).request_capacity is None
    assert merge_snapshots([TierMonitor().snapshot()]).request_capacity is None
    assert admission.capacity("edge") is None


def test_background_calls_start_only_while_a_replica_slot_is_free_and_count_at_the_door():
    """A background call (speculation's, edit preparation's) waiting in Serve's queue would take a place a
    user's request needs (a replica died: every call waits for the replacement), so one starts only while
    this ingress's requests leave a replica slot free, at most BACKGROUND_CALLS at once; while it runs it
    counts at the door like an admitted request."""
    admission = AdmissionControl({"cloud": 8}, max_wait_s=10.0, clock=FakeClock())
    assert admission.background_room("cloud")  # no view: no bound known
    view = merge_snapshots([replica_snapshot(4, 2), replica_snapshot(4, 2)])  # 8 slots, capacity 10
    assert view.replica_slots == 8
    admission.update({"cloud": replace(view, step_time_s=(0.1, 0.0))})
    with ExitStack() as held:
        for _ in range(BACKGROUND_CALLS):
            assert admission.background_room("cloud")
            held.enter_context(admission.holding("cloud"))
        assert not admission.background_room("cloud")  # BACKGROUND_CALLS running
        for _ in range(10 - BACKGROUND_CALLS):  # they take places at the door: room for 6 more requests
            assert admission.decide({"cloud": 10}) is None
            held.enter_context(admission.admit({"cloud": 10}))
        assert admission.decide({"cloud": 10}) is not None
    assert admission.background_requests == {"cloud": 0} and admission.own_requests == {"cloud": 0}
    with ExitStack() as admitted:  # the foreground holds 7 of the 8 slots: one background call may start
        for _ in range(7):
            admitted.enter_context(admission.admit({"cloud": 10}))
        assert admission.background_room("cloud")
        with admission.holding("cloud"):
            assert not admission.background_room("cloud")  # every slot taken: it would wait in the queue
    assert merge_snapshots([TierMonitor().snapshot()]).replica_slots is None  # outside Serve: unknown
