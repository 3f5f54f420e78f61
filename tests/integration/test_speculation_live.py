"""Speculative refinement on the live application: a preview is refined during the think time, and its
finalize answers `hit` with the pixels of a finalize without speculation; a foreground burst keeps the
cloud tier's slots, and a speculation submitted meanwhile waits for it (paused, not cancelled)."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

pytestmark = pytest.mark.ray


def cloud_replicas(http: httpx.Client) -> list[dict]:
    return http.get("/v1/stats").json()["tiers"]["cloud"]["per_replica"]


def speculation_stats(http: httpx.Client) -> dict:
    return http.get("/v1/stats").json()["speculation"]


def wait_for(condition, timeout_s: float = 30.0, period_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def test_preview_think_finalize_is_a_hit_with_the_pixels_of_no_speculation(http):
    before = speculation_stats(http)
    body = {"prompt": "a red circle on the left", "seed": 11, "session_id": "live-hit"}
    preview = http.post("/v1/preview", json=body).json()
    # think time: the speculation is registered and, the tier being idle, done
    wait_for(lambda: speculation_stats(http)["held"] >= 1)
    # the registry learns of a speculation as its replica takes it; give the replica the think time to run
    # it (an idle tiny-random tier needs well under a second) before reading that it holds none
    time.sleep(2.0)
    wait_for(lambda: all(r["background_requests"] == 0 for r in cloud_replicas(http)))
    refine = {"prompt": body["prompt"], "seed": 11, "preview_id": preview["preview_id"]}
    hit = http.post("/v1/refine", json=refine)
    assert hit.status_code == 200, hit.text
    off = http.post("/v1/refine", json={**refine, "speculation": "off"}).json()
    hit = hit.json()
    assert (hit["speculative"], off["speculative"]) == ("hit", "off")
    assert hit["image"] == off["image"]  # the same PNG bytes
    assert hit["unet_calls"] == off["unet_calls"] and hit["unet_calls"]["cloud"] > 0
    assert hit["strength_used"] == off["strength_used"] and hit["route"] == "cloud"
    # the image itself, resent instead of the id, finds the same speculation only once: now a miss
    again = http.post("/v1/refine", json={**refine, "preview_id": None, "image": preview["image"]}).json()
    assert again["speculative"] == "miss" and again["image"] == off["image"]
    after = speculation_stats(http)
    assert after["results"]["hit"] == before["results"]["hit"] + 1
    assert after["results"]["miss"] >= before["results"]["miss"] + 1
    assert after["unet_calls"]["used"] >= before["unet_calls"]["used"] + hit["unet_calls"]["cloud"]


def test_a_foreground_burst_keeps_the_slots_and_a_speculation_waits_for_it(http, serve_url):
    # a burst of long refinements fills the cloud tier's batch (max 4) and its queue
    preview = http.post("/v1/preview", json={"prompt": "a blue square", "seed": 3}).json()
    burst_body = {
        "prompt": "a blue square",
        "preview_id": preview["preview_id"],
        "strength": 1.0,
        "num_inference_steps": 200,
        "speculation": "off",
    }

    def refine(seed: int) -> httpx.Response:
        with httpx.Client(base_url=serve_url, timeout=300.0) as client:
            return client.post("/v1/refine", json={**burst_body, "seed": seed})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        burst = [pool.submit(refine, seed) for seed in range(6)]
        wait_for(lambda: sum(len(r["pool"]) for r in cloud_replicas(http)) >= 4)
        # a session previews meanwhile: its speculation is submitted, and paused while the burst runs
        body = {"prompt": "a green circle", "seed": 5, "session_id": "live-burst"}
        speculated = http.post("/v1/preview", json=body).json()
        waiting = wait_for(
            lambda: [
                r
                for r in cloud_replicas(http)
                if r["background_requests"] == 1 and len(r["pool"]) > r["max_batch_size"]
            ]
        )
        steps_left = waiting[0]["background_steps"]
        samples = []
        # while foreground samples wait for a slot, the speculation does not advance: its remaining steps
        # never fall below what they were when it was first seen waiting
        for _ in range(5):
            time.sleep(0.1)
            replica = cloud_replicas(http)[0]
            if len(replica["pool"]) > replica["max_batch_size"]:
                samples.append(replica["background_steps"])
        assert samples and all(steps >= steps_left for steps in samples), (steps_left, samples)
        responses = [future.result() for future in burst]
    assert all(response.status_code == 200 for response in responses)
    # the burst is over: the speculation resumes and answers the session's finalize
    wait_for(lambda: all(r["background_requests"] == 0 for r in cloud_replicas(http)))
    final = http.post(
        "/v1/refine", json={"prompt": body["prompt"], "seed": 5, "preview_id": speculated["preview_id"]}
    ).json()
    assert final["speculative"] == "hit"
