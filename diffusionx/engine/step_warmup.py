"""Start-up measurement of the cloud tier's batched step time, so the router has an estimate before the
first refinement (it seeds `service_model.StepTimeModel`)."""

from __future__ import annotations

import statistics
import time

from PIL import Image

from diffusionx.models.loading import LoadedModel
from diffusionx.requests import Img2ImgRequest
from diffusionx.sampling.step_batching import StepBatcher

WARMUP_PROMPT = "warm up"


def measure_step_time(
    model: LoadedModel, max_batch_size: int, repeats: int = 3, size: int | None = None
) -> list[tuple[int, float]]:
    """`(batch_size, seconds)` of one step-batched denoising step at batch sizes 1 and `max_batch_size`.

    Runs a throwaway `StepBatcher` on blank `size` x `size` images (default: the model's size) at strength
    1.0: one untimed step per batch size (kernel selection, caches), then the median of `repeats` timed
    steps. The samples never finish, so no decode is timed; the running fit adds that from real batches.
    """
    side = size or model.spec.default_size
    points: list[tuple[int, float]] = []
    for batch_size in sorted({1, max_batch_size}):
        batcher = StepBatcher(model, batch_size, tier="cloud")
        for seed in range(batch_size):
            image = Image.new("RGB", (side, side))
            batcher.add(Img2ImgRequest(WARMUP_PROMPT, image, 1.0, seed=seed, num_inference_steps=repeats + 2))
        batcher.step()
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            batcher.step()
            timings.append(time.perf_counter() - start)
        points.append((batch_size, statistics.median(timings)))
    return points
