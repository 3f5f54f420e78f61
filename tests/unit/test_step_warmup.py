"""The service model against the real `StepBatcher` (tiny model), and the start-up step-time warm-up."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusionx.engine.monitor import TierMonitor, merge_snapshots
from diffusionx.engine.step_warmup import measure_step_time
from diffusionx.policy.service_model import ReplicaLoad, StepTimeModel, expected_finish_s
from diffusionx.requests import Img2ImgRequest
from diffusionx.sampling.step_batching import StepBatcher


def refinement(seed: int, steps: int, strength: float = 1.0) -> Img2ImgRequest:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Img2ImgRequest(
        "a red circle", Image.fromarray(pixels), strength, seed=seed, num_inference_steps=steps
    )


def test_the_model_counts_the_real_batchers_steps(tiny_cloud):
    # with t(b) = 1 s, the predicted finish is the number of engine steps until the new request is done
    batcher = StepBatcher(tiny_cloud, max_batch_size=2)
    for seed, steps in enumerate((9, 3, 7)):
        batcher.add(refinement(seed, steps))
    for _ in range(2):  # some run, some wait: keys and remaining steps now differ
        batcher.step()
    batcher.add(refinement(3, 4))
    batcher.step()
    load = ReplicaLoad(pool=tuple(batcher.priorities()), max_batch_size=2, step_time_s=(1.0, 0.0))
    predicted = expected_finish_s(load, 5, step_in_flight_s=0.0)
    ticket = batcher.add(refinement(4, 5))
    steps = 0
    while not ticket.done:
        batcher.step()
        steps += 1
    assert predicted == steps


def test_priorities_are_the_order_step_picks(tiny_cloud):
    batcher = StepBatcher(tiny_cloud, max_batch_size=2)
    for seed, steps in enumerate((6, 2, 4)):
        batcher.add(refinement(seed, steps))
    keys = [key for key, _ in batcher.priorities()]
    assert keys == sorted(keys) and [r for _, r in batcher.priorities()] == [2, 4, 6]
    batcher.step()  # the two fewest-remaining samples advance, the third waits
    assert batcher.priorities() == [(1, 1), (3, 3), (5, 6)]


def test_warmup_measures_both_batch_sizes_and_seeds_the_fit(tiny_cloud):
    points = measure_step_time(tiny_cloud, max_batch_size=3, repeats=2)
    assert [b for b, _ in points] == [1, 3] and all(0 < s < 10 for _, s in points)
    model = StepTimeModel()
    model.seed(points)
    assert model.predict(1) == pytest.approx(points[0][1]) and model.predict(3) == pytest.approx(points[1][1])


def test_a_replica_snapshot_carries_what_the_service_model_reads():
    monitor = TierMonitor()
    monitor.max_batch_size = 4
    monitor.step_time.seed([(1, 0.02), (4, 0.05)])
    for steps in (10, 10, 6):
        monitor.enqueue(steps)
    monitor.admit(1)
    monitor.pool = [(10, 10)]
    merged = merge_snapshots([monitor.snapshot()])
    load = ReplicaLoad.from_snapshot(merged.per_replica[0])
    assert load.pool == ((10, 10),) and load.queued == (8, 8) and load.max_batch_size == 4
    assert load.step_time_s == pytest.approx((0.01, 0.01))


def test_fifo_order_runs_samples_in_arrival_order(tiny_cloud):
    batcher = StepBatcher(tiny_cloud, max_batch_size=1, order="fifo")
    long_ticket = batcher.add(refinement(0, 5))
    short_ticket = batcher.add(refinement(1, 2))
    steps = 0
    while not long_ticket.done:
        batcher.step()
        steps += 1
    assert steps == 5 and not short_ticket.done  # sjf would have run the short one first
    with pytest.raises(ValueError, match="order='lifo' is not allowed: use one of sjf, fifo"):
        StepBatcher(tiny_cloud, 1, order="lifo")
