"""The cloud tier's capacity, as the benchmarks size their loads.

`bench compare` measures it (`measured_capacity`: a run that keeps every batch full), and does not read it
from the replicas' published step-time fit: at start-up that fit comes from a warm-up timed while the
application's other replicas load, and the capacity it gave on this project's 2-core machine ranged over
3x from one start of the same application to the next (docs/results.md). The autoscaling bench reads the
fit (`capacity_per_s`): its GPU-timed replicas take their step times from a published profile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from clients import loadgen_rows

WAVES = 4  # the capacity run: finalizes sent at once, this many times the cloud tier's batch slots


@dataclass(frozen=True)
class Capacity:
    """`per_s` finalizes of `steps` cloud denoising steps each, completed per second."""

    per_s: float
    steps: float

    def at(self, steps: float) -> float:
        """Finalizes of `steps` cloud steps each per second: the same denoising steps per second."""
        return self.per_s * self.steps / max(1.0, steps)


def measured_capacity(rows: list[dict[str, Any]]) -> Capacity:
    """The capacity from a capacity run's rows (finalizes sent at once): the rate at which the middle half
    of its 2xx finalizes completed, the first and last quarters, where the batches fill and drain, left
    out."""
    ok = loadgen_rows.ok_finalizes(rows)
    done = sorted(float(row["arrival_s"]) + float(row["e2e_ms"]) / 1000.0 for row in ok)
    first, last = len(done) // 4, (3 * len(done)) // 4
    if last - first < 2 or done[last] <= done[first]:
        raise RuntimeError(f"the capacity run completed {len(done)} finalizes: too few to measure a rate")
    steps = sum(max(1.0, float(row["cloud_unet_calls"] or 0)) for row in ok) / len(ok)
    return Capacity((last - first) / (done[last] - done[first]), steps)


def capacity_run_size(url: str) -> int:
    """How many finalizes the capacity run sends at once: `WAVES` times the cloud tier's samples per step,
    summed over its replicas."""
    replicas = cloud_service(url).get("per_replica") or []
    return WAVES * max(1, sum(int(replica.get("max_batch_size", 1)) for replica in replicas))


def cloud_service(url: str) -> dict[str, Any]:
    """The cloud tier of GET /v1/stats as sent (with each replica's published service model)."""
    response = httpx.get(f"{url}/v1/stats", timeout=30.0)
    response.raise_for_status()
    return response.json()["tiers"]["cloud"]


def capacity_per_s(cloud: dict[str, Any], finalize_steps: float) -> float:
    """Finalizes per second the cloud tier sustains by its published step-time fit: each replica runs B
    samples per batched step."""
    total = 0.0
    for replica in cloud.get("per_replica") or []:
        step_time = replica.get("step_time_s")
        if not step_time:
            continue
        t0, t1 = step_time
        batch = int(replica.get("max_batch_size", 1))
        total += batch / (max(1.0, finalize_steps) * max(1e-4, t0 + t1 * batch))
    if total <= 0:
        raise RuntimeError("the cloud tier published no step time: cannot size the load")
    return total
