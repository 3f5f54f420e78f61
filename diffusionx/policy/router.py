"""Router policy: trade the predicted strength and the step count against the cloud tier's load.

Inputs are the predicted strength, the request's latency target and a `CloudLoad` snapshot (denoising steps
queued or running on the cloud tier, its replicas and measured seconds per step). The expected latency of
a refinement with `n` cloud steps is

    wait = queued_steps / replicas * seconds_per_step      (work ahead of us, spread over replicas)
    run  = n * seconds_per_step
    expected = wait + run + overhead

The policy, in order, until the expected latency fits the target:
1. refine fully: `strength_predicted` over the full schedule (route `cloud`);
2. cut steps: shorten the schedule down to `min_steps` at the same strength (route `cloud-reduced`);
3. cut strength: lower the strength down to `strength_floor` (the quality floor) (route `cloud-reduced`);
4. fall back to the edge tier: the edge model refines instead, no cloud work (route `edge-fallback`).
Without a latency target, or with an unmeasured step time, it refines fully. Every decision says why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CloudLoad:
    queued_steps: int = 0  # denoising steps queued or in flight on the cloud tier
    replicas: int = 1
    seconds_per_step: float | None = None  # measured; None before the first cloud batch

    def to_dict(self) -> dict[str, float]:
        return {k: (-1.0 if v is None else float(v)) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RouterConfig:
    min_steps: int = 10  # fewest schedule steps a cloud refinement may use
    strength_floor: float = 0.2  # lowest strength that still counts as a refinement
    overhead_ms: float = 50.0  # encode/decode/transport, on top of the steps


@dataclass(frozen=True)
class RouteDecision:
    route: str  # "cloud" | "cloud-reduced" | "edge-fallback"
    strength: float
    num_inference_steps: int
    expected_latency_ms: float
    reason: str

    @property
    def cloud_steps(self) -> int:
        return 0 if self.route == "edge-fallback" else int(self.num_inference_steps * self.strength)


def expected_latency_ms(load: CloudLoad, cloud_steps: int, config: RouterConfig) -> float:
    step_s = load.seconds_per_step or 0.0
    wait_s = load.queued_steps / max(1, load.replicas) * step_s
    return (wait_s + cloud_steps * step_s) * 1000.0 + config.overhead_ms


def decide_route(
    strength_predicted: float,
    num_inference_steps: int,
    load: CloudLoad,
    latency_target_ms: float | None = None,
    config: RouterConfig | None = None,
) -> RouteDecision:
    config = config or RouterConfig()
    if not 0.0 <= strength_predicted <= 1.0:
        raise ValueError(f"strength_predicted={strength_predicted} must be in [0, 1]")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")

    def latency(steps: int, strength: float) -> float:
        return expected_latency_ms(load, int(steps * strength), config)

    full = latency(num_inference_steps, strength_predicted)
    if latency_target_ms is None or load.seconds_per_step is None or full <= latency_target_ms:
        why = "no latency target" if latency_target_ms is None else "fits the latency target"
        if latency_target_ms is not None and load.seconds_per_step is None:
            why = "cloud step time not measured yet"
        return RouteDecision(
            "cloud", strength_predicted, num_inference_steps, full, f"full refinement: {why}"
        )

    # 2. fewer steps at the predicted strength
    min_steps = min(config.min_steps, num_inference_steps)
    for steps in range(num_inference_steps - 1, min_steps - 1, -1):
        expected = latency(steps, strength_predicted)
        if expected <= latency_target_ms:
            return RouteDecision(
                "cloud-reduced",
                strength_predicted,
                steps,
                expected,
                f"cut steps {num_inference_steps}->{steps} to meet {latency_target_ms:.0f} ms",
            )
    # 3. lower strength at the fewest steps, down to the quality floor
    floor = min(config.strength_floor, strength_predicted)
    for cloud_steps in range(int(min_steps * strength_predicted) - 1, -1, -1):
        strength = (cloud_steps + 1e-9) / min_steps
        if strength < floor:
            break
        expected = expected_latency_ms(load, cloud_steps, config)
        if expected <= latency_target_ms:
            strength = math.ceil(strength * 1000) / 1000
            return RouteDecision(
                "cloud-reduced",
                strength,
                min_steps,
                expected,
                f"cut steps to {min_steps} and strength {strength_predicted:.2f}->{strength:.2f} "
                f"to meet {latency_target_ms:.0f} ms",
            )
    # 4. the cloud cannot meet the target within the quality floor
    return RouteDecision(
        "edge-fallback",
        strength_predicted,
        num_inference_steps,
        config.overhead_ms,
        f"cloud expected {full:.0f} ms (queue {load.queued_steps} steps on {load.replicas} replica(s)) "
        f"exceeds {latency_target_ms:.0f} ms even at {min_steps} steps and strength {floor:.2f}",
    )
