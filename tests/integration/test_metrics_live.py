"""Prometheus metrics on the live application: after a few requests the node's metrics endpoint, named by
/v1/stats as `metrics_url`, carries the diffusionx_* series (Ray prefixes them with `ray_`)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.integration.conftest import TEST_METRICS_PORT

pytestmark = pytest.mark.ray

EXPECTED = [
    "diffusionx_queued_requests",
    "diffusionx_queued_steps",
    "diffusionx_running_requests",
    "diffusionx_running_steps",
    "diffusionx_batch_size_samples",
    "diffusionx_batched_step_seconds",
    "diffusionx_queue_wait_seconds",
    "diffusionx_model_seconds",
    "diffusionx_tier_requests_total",
    "diffusionx_request_seconds",
    "diffusionx_routes_total",
    "diffusionx_strength_predicted_ratio",
    "diffusionx_strength_used_ratio",
    "diffusionx_retries_total",
    "diffusionx_edit_preparations_total",
    "diffusionx_edit_inputs_total",
]


def test_scraping_the_metrics_port_shows_the_diffusionx_series(http):
    preview = http.post("/v1/preview", json={"prompt": "a red circle", "seed": 1}).json()
    final = http.post(
        "/v1/refine", json={"prompt": "a red circle", "preview_id": preview["preview_id"]}
    ).json()
    # an edit of it (predicted strength) finds its input prepared by the edge meanwhile
    time.sleep(0.5)
    edited = http.post(
        "/v1/preview", json={"prompt": "a blue circle", "seed": 1, "preview_id": preview["preview_id"]}
    )
    assert edited.status_code == 200
    # a client's retry is marked with the attempt header and counted
    again = http.post(
        "/v1/preview", json={"prompt": "a red circle", "seed": 1}, headers={"X-DiffusionX-Attempt": "2"}
    )
    assert again.status_code == 200
    url = http.get("/v1/stats").json()["metrics_url"]
    assert url.endswith(f":{TEST_METRICS_PORT}/metrics"), url

    hit = re.compile(r'^ray_diffusionx_edit_inputs_total\{[^}]*result="hit"[^}]*\} [1-9]', re.MULTILINE)
    deadline = time.monotonic() + 60
    missing, text = EXPECTED, ""
    while (missing or not hit.search(text)) and time.monotonic() < deadline:  # reported every second
        text = httpx.get(url, timeout=10).text
        names = set(re.findall(r"^ray_(diffusionx_\w+?)(?:_bucket|_count|_sum)?\{", text, re.MULTILINE))
        missing = [name for name in EXPECTED if name not in names]
        if missing or not hit.search(text):
            time.sleep(1)
    assert not missing, f"not exported after 60 s: {missing}"
    assert hit.search(text), "the edit did not find its input prepared"
    # the series carry their labels: the tier, and the route the router took
    assert re.search(r'^ray_diffusionx_model_seconds_count\{[^}]*tier="edge"', text, re.MULTILINE)
    route = final["route"]
    assert re.search(
        rf'^ray_diffusionx_routes_total\{{[^}}]*route="{route}"[^}}]*\}} [1-9]', text, re.MULTILINE
    )
    # the fixed local port serves the same
    assert "ray_diffusionx_queued_steps" in httpx.get(f"http://127.0.0.1:{TEST_METRICS_PORT}/metrics").text
