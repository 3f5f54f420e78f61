"""Autoscaling on the work a tier holds, in batched denoising steps, against a target wait.

Why not Serve's default. The default policy scales on ongoing requests per replica. A cloud refinement is 2
to 50 denoising steps, and a replica runs up to `B` samples per UNet call (step-level batching), so eight
2-step refinements are one short batch while eight 40-step ones are a long one: request counts misjudge the
tier both ways.

Signal. Each replica reports, through Ray Serve's custom autoscaling metrics (`record_autoscaling_stats`,
see `autoscaling_stats`), the work it holds in *batched steps*, i.e. the model calls it needs to finish
everything queued and running: `S / min(n, B)` for `n` requests with `S` denoising steps left in all,
which is exact when requests share batches (step-level batching; whole batches of equal steps) and never
counts a step twice; and the seconds one batched step takes there, measured (`t(b)` of the service model's
fitted step time at the batch size the work runs in). Work in seconds is their
product: how long the replica needs to finish what it holds, about what a new request waits.

Decision (`QueuedStepsPolicy`, a Serve custom policy: `AutoscalingConfig.policy.policy_function`). The
tier needs enough replicas that, shared out, the work is done within `target_wait_s`:
`desired = (sum over replicas of work_s + work waiting at the handles) / target_wait_s`, as a float that
Serve rounds up, bounds by min/max replicas and holds back by `upscale_delay_s` / `downscale_delay_s` (the
framework applies those to custom policies too). Requests still waiting at the handles (every replica is
full) count too: each as the mean steps per request the replicas report, in full batches. A replica that
has not measured a step yet is costed at the tier's mean step time, or `default_step_s`. Until any replica
reports, the policy holds the current target. Metrics are averaged by Serve over `look_back_period_s`.

Set `target_wait_s` above one refinement's own run time (steps x step time): a replica that is busy with a
single request already holds that much work, and a target below it would ask for replicas that cannot help.

This module imports nothing from Ray: the policy reads the context's attributes only, so it is tested with
fake contexts, and Serve pickles it by value into the controller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusionx.policy.service_model import MIN_STEP_S

# names of the custom metrics a replica reports (`record_autoscaling_stats`) and the policy reads
QUEUED_BATCHED_STEPS = "queued_batched_steps"  # model calls needed to finish the replica's work
BATCHED_STEP_S = "batched_step_s"  # seconds of one batched step on the replica (0: not measured yet)
STEPS_PER_REQUEST = "steps_per_request"  # mean denoising steps left per request held (0: none held)
MAX_BATCH_SIZE = "max_batch_size"  # samples per model call
FULL_BATCH_STEP_S = "full_batch_step_s"  # seconds of one step at max_batch_size (0: not measured yet)


def batched_steps(queued_steps: int, requests: int, max_batch_size: int) -> float:
    """Model calls needed to run `queued_steps` denoising steps of `requests` requests, `max_batch_size`
    samples per call: `S / min(n, B)` (module docstring)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
    if requests <= 0 or queued_steps <= 0:
        return 0.0
    return queued_steps / min(requests, max_batch_size)


def autoscaling_stats(snapshot: Mapping[str, Any]) -> dict[str, float]:
    """What a replica returns from `record_autoscaling_stats`, from its `TierMonitor` snapshot (`queued`,
    `in_flight`, `queued_steps`, `max_batch_size`, and the step time: `t(b)` of the fitted `step_time_s`
    at the batch its work runs in, else the mean `seconds_per_step`, else 0 for not measured)."""
    requests = int(snapshot["queued"]) + int(snapshot["in_flight"])
    steps = max(0, int(snapshot["queued_steps"]))
    max_batch_size = max(1, int(snapshot.get("max_batch_size") or 1))
    step_s = full_s = snapshot.get("seconds_per_step") or 0.0
    if snapshot.get("step_time_s"):
        t0, t1 = snapshot["step_time_s"]
        step_s = max(MIN_STEP_S, t0 + t1 * min(max(requests, 1), max_batch_size))
        full_s = max(MIN_STEP_S, t0 + t1 * max_batch_size)
    return {
        QUEUED_BATCHED_STEPS: batched_steps(steps, requests, max_batch_size),
        BATCHED_STEP_S: float(step_s),
        STEPS_PER_REQUEST: steps / requests if requests > 0 else 0.0,
        MAX_BATCH_SIZE: float(max_batch_size),
        FULL_BATCH_STEP_S: float(full_s),
    }


@dataclass(frozen=True)
class HeldWork:
    """The work a tier holds (module docstring, steps 1-2), from a Serve autoscaling context."""

    work_s: float  # seconds of batched steps held by the replicas and waiting at the handles
    waiting_requests: float
    step_s: float  # the tier's mean measured batched step (or the default), for unmeasured replicas


def held_work(ctx: Any, default_step_s: float) -> HeldWork | None:
    """What the replicas report and the handles hold, in seconds; None until any replica has reported."""
    metrics = ctx.aggregated_metrics or {}
    steps = metrics.get(QUEUED_BATCHED_STEPS, {})
    if not steps:
        return None
    step_times = metrics.get(BATCHED_STEP_S, {})
    measured = [s for s in step_times.values() if s > 0]
    fallback_s = sum(measured) / len(measured) if measured else default_step_s
    # 1. the work the replicas hold, in seconds of batched steps
    held_s = sum(n * (step_times.get(r) or fallback_s) for r, n in steps.items())
    # 2. requests waiting at the handles: mean steps per request, in full batches
    waiting = float(ctx.total_queued_requests or 0.0)
    per_request = [s for s in metrics.get(STEPS_PER_REQUEST, {}).values() if s > 0]
    sizes = list(metrics.get(MAX_BATCH_SIZE, {}).values()) or [1.0]
    waiting_s = 0.0
    if waiting > 0 and per_request:
        mean_steps = sum(per_request) / len(per_request)
        waiting_s = waiting * mean_steps / max(1.0, max(sizes)) * fallback_s
    return HeldWork(work_s=held_s + waiting_s, waiting_requests=waiting, step_s=fallback_s)


@dataclass
class QueuedStepsPolicy:
    """Serve custom autoscaling policy: replicas = work held (seconds) / target wait (module docstring).

    Serve instantiates it once with `policy_kwargs` and calls it with an `AutoscalingContext` every
    control-loop tick; it returns `(desired replicas, policy state)`.
    """

    target_wait_s: float = 10.0  # seconds a replica may need to finish the work it holds
    default_step_s: float = 0.1  # a batched step's seconds before any replica has measured one

    def __post_init__(self) -> None:
        for name in ("target_wait_s", "default_step_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is not allowed: use a number of seconds > 0")

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        held = held_work(ctx, self.default_step_s)
        if held is None:  # no replica has reported yet: hold
            return ctx.target_num_replicas, {}
        # 3. enough replicas to finish it within the target wait (Serve rounds up and bounds it)
        desired = held.work_s / self.target_wait_s
        return desired, {"work_s": round(held.work_s, 3), "waiting_requests": held.waiting_requests}
