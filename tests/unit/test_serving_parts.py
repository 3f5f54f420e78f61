"""The Ray-free parts of serving: strength heuristic, tier monitor, preview cache, image codec, schemas."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from diffusionx.api import GenerateBody, PreviewBody, RefineBody
from diffusionx.engine.monitor import TierMonitor, TierSnapshot, merge_snapshots
from diffusionx.engine.preview_cache import ENTRY_OVERHEAD_BYTES, PreviewCache
from diffusionx.imaging import decode_png_base64, encode_png_base64
from diffusionx.policy.strength import HeuristicStrengthConfig, predict_strength, residual_noise
from diffusionx.requests import InvalidRequestError


def test_noisier_previews_and_richer_prompts_get_more_strength():
    flat = Image.new("RGB", (32, 32), (40, 90, 200))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert residual_noise(flat) == pytest.approx(0.0, abs=1e-6) and residual_noise(noise) > 0.8
    config = HeuristicStrengthConfig()
    expected = max(config.s_min, config.base + 0.2 / 12)
    assert predict_strength("a circle", flat) == pytest.approx(expected, abs=1e-6)
    assert predict_strength("a circle", noise) > predict_strength("a circle", flat)
    rich = "a large red circle on the left and a small green square at the top, blue background"
    assert predict_strength(rich, flat) > predict_strength("a circle", flat)
    assert config.s_min <= predict_strength(rich * 3, noise) <= config.s_max


def test_tier_monitor_tracks_queue_batches_and_step_time():
    monitor = TierMonitor()
    for steps in (10, 10, 20):
        monitor.enqueue(steps)
    assert (monitor.queued, monitor.queued_steps) == (3, 40)
    monitor.admit(2)
    assert (monitor.queued, monitor.in_flight) == (1, 2)
    monitor.ran(2, 10, elapsed_s=1.0)
    monitor.progressed(20)
    monitor.completed(2)
    snap = monitor.snapshot()
    assert snap.queued_steps == 20 and snap.recent_batch_sizes == [2]
    # one step-time estimator: the fitted t(b) at the mean recent batch size
    assert snap.seconds_per_step == pytest.approx(0.1) and snap.requests_served == 2
    assert snap.step_time_s == pytest.approx([0.1, 0.0])
    assert TierSnapshot.from_dict({**snap.to_dict(), "newer_field": 1}) == snap
    other = replace(snap, seconds_per_step=0.3, recent_batch_sizes=[5], step_time_s=[0.1, 0.3])
    merged = merge_snapshots([replace(snap, step_time_s=[0.1, 0.1]), other])
    assert merged.step_time_s == pytest.approx((0.1, 0.2))  # the mean fit
    assert merged.replicas == 2 and merged.queued_steps == 40
    assert merged.recent_batch_sizes == (2, 5) and merged.seconds_per_step == pytest.approx(0.2)
    assert merged.to_dict()["step_time_s"] == pytest.approx([0.1, 0.2])
    assert merged.to_dict()["per_replica"][1]["step_time_s"] == [0.1, 0.3]


def test_preview_cache_is_bounded_by_bytes_and_age_and_scoped_to_its_owner():
    now = [0.0]
    entry = len(b"x" * 1000) + ENTRY_OVERHEAD_BYTES
    cache = PreviewCache(max_bytes=2 * entry, ttl_s=60.0, timer=lambda: now[0])
    a, b = cache.put(b"a" * 1000), cache.put(b"b" * 1000)
    assert cache.get(a) == b"a" * 1000  # a is now most recent
    c = cache.put(b"c" * 1000)  # over the byte bound: evicts b, the least recently used
    assert cache.get(b) is None and cache.get(a) == b"a" * 1000 and cache.get(c) == b"c" * 1000
    stats = cache.stats()
    assert stats["evictions"] == 1 and stats["size"] == 2 and stats["bytes"] == 2 * entry
    # the caller may make the id (the ingress does, before the put lands)
    assert cache.put(b"d", "made-by-the-ingress") == "made-by-the-ingress"
    assert cache.get("made-by-the-ingress") == b"d"
    # another owner's id reads as unknown
    mine = cache.put(b"m", owner="k1")
    assert cache.get(mine, owner="k2") is None and cache.get(mine) is None and cache.get(mine, "k1") == b"m"
    # age: everything expires after ttl_s
    now[0] = 61.0
    assert cache.get(a) is None and cache.stats()["size"] == 0 and cache.stats()["bytes"] == 0
    # a PNG larger than the whole cache is not kept (its id answers 404; the client resends the image)
    big = cache.put(b"z" * (3 * entry))
    assert cache.get(big) is None and cache.stats()["too_large"] == 1
    with pytest.raises(ValueError, match="max_bytes=0"):
        PreviewCache(0)


def test_png_round_trip_and_clear_decode_errors():
    image = Image.new("RGB", (16, 24), (1, 2, 3))
    assert np.array_equal(np.asarray(decode_png_base64(encode_png_base64(image))), np.asarray(image))
    with pytest.raises(InvalidRequestError, match="not valid base64"):
        decode_png_base64("@@@")
    with pytest.raises(InvalidRequestError, match="does not decode as an image"):
        decode_png_base64(base64.b64encode(b"hello").decode())
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16)).save(buffer, format="PNG")
    with pytest.raises(InvalidRequestError, match="image width=20 is not allowed"):
        decode_png_base64(base64.b64encode(buffer.getvalue()).decode())


def test_schemas_say_what_is_allowed():
    assert PreviewBody(prompt="a").width is None
    with pytest.raises(ValidationError, match="multiple of 8"):
        PreviewBody(prompt="a", width=12)
    assert PreviewBody(prompt="a", preview_id="x").strength is None  # the edit predictor picks it
    with pytest.raises(ValidationError, match="strength applies to an edit"):
        PreviewBody(prompt="a", strength=0.5)
    with pytest.raises(ValidationError, match="exactly one of image or preview_id"):
        RefineBody(prompt="a", image="x", preview_id="y")
    with pytest.raises(ValidationError, match="switch_step only applies"):
        GenerateBody(prompt="a", mode="cloud", switch_step=3)
    assert (
        GenerateBody(prompt="a", mode="ec-diff", warmup_steps=7, approx_interval=2, smoothing=0.3).mode
        == "ec-diff"
    )
