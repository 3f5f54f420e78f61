"""Streamed progress on the live application: server-sent events from the tier replicas through the
ingress (Ray Serve streaming end to end), the plain JSON answer unchanged, and a client that goes away
mid-stream cancelling its work."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

pytestmark = pytest.mark.ray

SSE = {"Accept": "text/event-stream"}


def read_events(response: httpx.Response, limit: int | None = None) -> list[tuple[str, dict]]:
    events: list[tuple[str, dict]] = []
    name, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                events.append((name, json.loads("\n".join(data))))
                if limit is not None and len(events) >= limit:
                    return events
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events


def stream(serve_url: str, path: str, body: dict) -> tuple[list[tuple[str, dict]], str]:
    """The events of a streamed request, and the raw text of the stream."""
    with httpx.stream("POST", f"{serve_url}{path}", json=body, headers=SSE, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    return read_events(httpx.Response(200, text=raw)), raw


def test_preview_and_refine_stream_one_event_per_step_then_the_normal_response(http, serve_url, capsys):
    body = {"prompt": "a red circle", "seed": 4, "num_inference_steps": 6}
    events, _ = stream(serve_url, "/v1/preview", body)
    progress, (last_name, result) = events[:-1], events[-1]
    assert [(e["step"], e["total_steps"], e["tier"]) for _, e in progress] == [
        (i, 6, "edge") for i in range(1, 7)
    ]
    assert all(name == "progress" for name, _ in progress) and last_name == "result"
    elapsed = [e["elapsed_ms"] for _, e in progress]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    plain = http.post("/v1/preview", json=body).json()
    assert result.keys() == plain.keys() and result["image"] == plain["image"]
    assert result["unet_calls"] == plain["unet_calls"] == {"cloud": 0, "edge": 6, "approximated": 0}

    refine = {"prompt": "a red circle", "seed": 4, "preview_id": result["preview_id"], "strength": 0.5}
    events, raw = stream(serve_url, "/v1/refine", {**refine, "num_inference_steps": 20})
    with capsys.disabled():  # a sample of the stream in the test output (the base64 image shortened)
        print(
            "\nSSE sample (POST /v1/refine, strength 0.5 of 20 steps):\n"
            + re.sub(r'"image":"(.{24})[^"]*"', r'"image":"\1..."', raw)
        )
    assert [(e["step"], e["total_steps"], e["tier"]) for _, e in events[:-1]] == [
        (i, 10, "cloud") for i in range(1, 11)
    ]
    name, final = events[-1]
    plain = http.post("/v1/refine", json={**refine, "num_inference_steps": 20}).json()
    assert name == "result" and final.keys() == plain.keys() and final["route"] == plain["route"] == "cloud"
    assert final["image"] == plain["image"] and final["unet_calls"]["cloud"] == 10


def test_a_predicted_edit_streams_its_steps_then_the_plain_answer(http, serve_url):
    """An edit without a strength: the edge replica predicts it and edits in the same streamed call."""
    first = http.post("/v1/preview", json={"prompt": "a red circle", "seed": 5}).json()
    body = {
        "prompt": "a blue circle",
        "previous_prompt": "a red circle",
        "preview_id": first["preview_id"],
        "seed": 5,
    }
    events, _ = stream(serve_url, "/v1/preview", body)
    (name, result), progress = events[-1], events[:-1]
    plain = http.post("/v1/preview", json=body).json()
    assert name == "result" and result["image"] == plain["image"]
    assert result["strength"] == result["strength_predicted"] == plain["strength_predicted"]
    assert "predict" in result["timings_ms"]
    steps = result["unet_calls"]["edge"]
    assert [(e["step"], e["tier"]) for _, e in progress] == [(i, "edge") for i in range(1, steps + 1)]


def test_a_request_that_fails_before_any_step_gets_its_usual_error_response(serve_url):
    response = httpx.post(
        f"{serve_url}/v1/refine", json={"prompt": "a", "preview_id": "missing"}, headers=SSE, timeout=60
    )
    assert response.status_code == 404 and "unknown or has expired" in response.json()["error"]
    response = httpx.post(f"{serve_url}/v1/preview", json={"prompt": "a", "width": 30}, headers=SSE)
    assert response.status_code == 422 and "multiple of 8" in response.json()["error"]


def test_the_client_reports_progress_through_on_progress(serve_url):
    from clients import DiffusionXClient

    seen = []
    with DiffusionXClient(serve_url) as client:
        session = client.session(seed=2)
        session.preview("a blue square", on_progress=seen.append)
        final = session.finalize(strength=0.5, num_inference_steps=8, on_progress=seen.append)
    assert [(e.tier, e.step) for e in seen] == [("edge", 1), ("edge", 2)] + [
        ("cloud", i) for i in range(1, 5)
    ]
    assert final.route == "cloud" and final.unet_calls["cloud"] == 4


def test_a_client_that_disconnects_mid_stream_cancels_the_work(http, serve_url):
    def cloud() -> dict:
        return http.get("/v1/stats").json()["tiers"]["cloud"]

    size = {"width": 128, "height": 128}  # 200 steps at 128x128: seconds of work even on an idle machine
    preview = http.post("/v1/preview", json={"prompt": "a red circle", "seed": 9, **size}).json()
    served_before = cloud()["requests_served"]
    body = {
        "prompt": "a red circle",
        "preview_id": preview["preview_id"],
        "strength": 1.0,
        "num_inference_steps": 200,
    }
    with httpx.stream("POST", f"{serve_url}/v1/refine", json=body, headers=SSE, timeout=60) as response:
        first = read_events(response, limit=2)
    assert [name for name, _ in first] == ["progress", "progress"]
    step_ms = first[1][1]["elapsed_ms"] - first[0][1]["elapsed_ms"]
    # the connection is closed: the tier's load must go back to zero before 198 more steps could run
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        load = cloud()
        if load["in_flight"] == 0 and load["queued"] == 0 and load["queued_steps"] == 0:
            break
        time.sleep(0.2)
    assert (load["in_flight"], load["queued"], load["queued_steps"]) == (0, 0, 0), load
    assert load["requests_served"] == served_before, "the refinement ran to its end instead of stopping"
    print(f"cancelled after the client left (one step took {step_ms:.1f} ms)")
