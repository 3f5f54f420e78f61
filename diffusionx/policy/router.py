"""Router policy: trade the predicted strength and the step count against the cloud tier's load.

Inputs are the predicted strength, the request's latency target and a `CloudLoad` snapshot (per cloud
replica: the samples in its step batcher and their remaining steps, its queue, its batch capacity and the
fitted time of a batched step, `t(b) = t0 + t1 * b`). The expected latency of a refinement with `n` cloud
steps is the service model's (`service_model.predict_tier`): when the request would finish if it joined
the replica it is expected to land on, replaying the step batcher's fewest-remaining-steps-first
schedule, plus a fixed overhead (encode, batch wait, transport).

The policy, in order, until the expected latency fits the target:
1. refine fully: `strength_predicted` over the full schedule (route `cloud`);
2. cut steps: shorten the schedule down to `min_steps` at the same strength (route `cloud-reduced`);
3. cut strength: lower the strength down to `strength_floor` (the quality floor) (route `cloud-reduced`);
4. fall back to the edge tier: the edge model refines instead, no cloud work (route `edge-fallback`).
Without a latency target, or with an unmeasured step time, it refines fully. Every decision says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffusionx.policy.cost import img2img_steps
from diffusionx.policy.service_model import Arrivals, ReplicaLoad, choose_replica, predict_tier
from diffusionx.requests import Route


@dataclass(frozen=True)
class CloudLoad:
    replicas: tuple[ReplicaLoad, ...] = ()  # one per live cloud replica

    @property
    def measured(self) -> bool:
        """Some replica has a step time (from its warm-up or its batches); requests are expected there."""
        return any(replica.step_time_s is not None for replica in self.replicas)

    def to_dict(self, steps: int = 1) -> dict[str, float]:
        """What a decision used (-1 where unknown): the work, capacity and step time of the replica a
        refinement of `steps` cloud steps is expected on."""
        if not self.replicas:
            return {"replicas": 0.0}
        index = choose_replica(self.replicas, steps)
        replica = self.replicas[index]
        t0, t1 = replica.step_time_s or (-1e-3, -1e-3)
        return {
            "replicas": float(len(self.replicas)),
            "replica": float(index),
            "samples": float(len(replica.pool)),
            "queued": float(len(replica.queued)),
            "remaining_steps": float(replica.remaining_steps),
            "tier_remaining_steps": float(sum(r.remaining_steps for r in self.replicas)),
            "max_batch_size": float(replica.max_batch_size),
            "step_t0_ms": round(t0 * 1000.0, 3),
            "step_t1_ms": round(t1 * 1000.0, 3),
        }


@dataclass(frozen=True)
class RouterConfig:
    min_steps: int = 10  # fewest schedule steps a cloud refinement may use
    strength_floor: float = 0.2  # lowest strength that still counts as a refinement
    overhead_ms: float = 50.0  # encode/decode/transport, on top of the steps
    slo_quantile: float = 0.99  # share of refinements the target should hold for (the calibration's margin)


@dataclass(frozen=True)
class RouteDecision:
    route: Route
    strength: float
    num_inference_steps: int
    expected_latency_ms: float | None  # None: the cloud step time is not measured yet
    reason: str
    latency_scale: float = 1.0  # the calibration factor `expected_latency_ms` includes

    @property
    def uncorrected_latency_ms(self) -> float | None:
        """The service model's expectation before the calibration factor (what calibration observes)."""
        if self.expected_latency_ms is None:
            return None
        return self.expected_latency_ms / self.latency_scale

    @property
    def cloud_steps(self) -> int:
        """The refinement's UNet calls on the cloud tier (`policy.cost`): none when it falls back."""
        if self.route is Route.EDGE_FALLBACK:
            return 0
        return img2img_steps(self.num_inference_steps, self.strength)


def expected_latency_ms(
    load: CloudLoad,
    cloud_steps: int,
    config: RouterConfig,
    latency_scale: float = 1.0,
    arrivals: Arrivals | None = None,
) -> float:
    """Service-model finish time of `cloud_steps` on the tier (with the cloud work expected to arrive
    meanwhile), plus the overhead, times the calibration factor (`calibration.LatencyCalibration.scale`;
    needs `load.measured`)."""
    finish_s = predict_tier(load.replicas, cloud_steps, arrivals).finish_s
    return (finish_s * 1000.0 + config.overhead_ms) * latency_scale


def decide_route(
    strength_predicted: float,
    num_inference_steps: int,
    load: CloudLoad,
    latency_target_ms: float | None = None,
    config: RouterConfig | None = None,
    latency_scale: float = 1.0,
    arrivals: Arrivals | None = None,
    latency_margin: float = 1.0,
) -> RouteDecision:
    """The route (see the module docstring). Expected latencies count the cloud work `arrivals` says will
    join meanwhile (`calibration.ArrivalRate`) and are multiplied by `latency_scale`, the online
    calibration factor learned from measured latencies (`calibration.LatencyCalibration`). A route fits
    the target when its expected latency times `latency_margin` (>= 1: the calibration's spread, so that
    the target holds for a quantile of requests, not half of them) is within it."""
    config = config or RouterConfig()
    if not 0.0 <= strength_predicted <= 1.0:
        raise ValueError(f"strength_predicted={strength_predicted} must be in [0, 1]")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
    # 1. the full refinement, when nothing constrains it or it fits the target
    if not load.measured:
        why = "no latency target" if latency_target_ms is None else "cloud step time not measured yet"
        reason = f"full refinement: {why}"
        return RouteDecision(
            Route.CLOUD, strength_predicted, num_inference_steps, None, reason, latency_scale
        )
    fit = _Fit(load, config, latency_scale, arrivals, latency_margin, latency_target_ms)
    full = fit.expected(img2img_steps(num_inference_steps, strength_predicted))
    if latency_target_ms is None or fit.fits(full):
        why = "no latency target" if latency_target_ms is None else "fits the latency target"
        reason = f"full refinement: {why}"
        return RouteDecision(
            Route.CLOUD, strength_predicted, num_inference_steps, full, reason, latency_scale
        )
    # 2. fewer steps at the predicted strength; 3. lower strength at the fewest steps, down to the floor
    min_steps = min(config.min_steps, num_inference_steps)
    reduced = _cut_steps(fit, strength_predicted, num_inference_steps, min_steps)
    reduced = reduced or _cut_strength(fit, strength_predicted, min_steps)
    if reduced is not None:
        return reduced
    # 4. the cloud cannot meet the target within the quality floor
    floor = min(config.strength_floor, strength_predicted)
    used = load.to_dict(img2img_steps(num_inference_steps, strength_predicted))
    return RouteDecision(
        Route.EDGE_FALLBACK,
        strength_predicted,
        num_inference_steps,
        config.overhead_ms * latency_scale,
        f"cloud expected {full:.0f} ms ({used['samples']:.0f} samples and {used['queued']:.0f} queued, "
        f"{used['remaining_steps']:.0f} steps, on replica {used['replica']:.0f} of {len(load.replicas)}) "
        f"exceeds {latency_target_ms:.0f} ms even at {min_steps} steps and strength {floor:.2f}",
        latency_scale,
    )


@dataclass(frozen=True)
class _Fit:
    """Expected latencies against a target, for one decision."""

    load: CloudLoad
    config: RouterConfig
    latency_scale: float
    arrivals: Arrivals | None
    latency_margin: float
    target_ms: float | None

    def expected(self, cloud_steps: int) -> float:
        return expected_latency_ms(self.load, cloud_steps, self.config, self.latency_scale, self.arrivals)

    def fits(self, expected_ms: float) -> bool:
        return self.target_ms is not None and expected_ms * self.latency_margin <= self.target_ms

    def reduced(self, strength: float, steps: int, expected_ms: float, why: str) -> RouteDecision:
        return RouteDecision(
            Route.CLOUD_REDUCED,
            strength,
            steps,
            expected_ms,
            f"{why} to meet {self.target_ms:.0f} ms",
            self.latency_scale,
        )


def _cut_steps(fit: _Fit, strength: float, num_inference_steps: int, min_steps: int) -> RouteDecision | None:
    """The most steps, down to `min_steps`, at which the predicted strength fits the target."""
    for steps in range(num_inference_steps - 1, min_steps - 1, -1):
        expected = fit.expected(img2img_steps(steps, strength))
        if fit.fits(expected):
            return fit.reduced(strength, steps, expected, f"cut steps {num_inference_steps}->{steps}")
    return None


def _cut_strength(fit: _Fit, strength_predicted: float, min_steps: int) -> RouteDecision | None:
    """The highest strength at `min_steps`, down to the quality floor, that fits the target."""
    floor = min(fit.config.strength_floor, strength_predicted)
    for cloud_steps in range(int(min_steps * strength_predicted) - 1, -1, -1):
        strength = (cloud_steps + 1e-9) / min_steps
        if strength < floor:
            break
        expected = fit.expected(cloud_steps)
        if fit.fits(expected):
            strength = math.ceil(strength * 1000) / 1000
            why = f"cut steps to {min_steps} and strength {strength_predicted:.2f}->{strength:.2f}"
            return fit.reduced(strength, min_steps, expected, why)
    return None
