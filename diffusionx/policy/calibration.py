"""Online measurements that correct the router's expected latency: the rate of cloud work arriving
(`ArrivalRate`, for the service model's replay of later arrivals) and measured against expected latency
(`LatencyCalibration`).

The service model (`service_model.predict_tier`) predicts when the cloud's step batcher would finish a
refinement, from the load the replicas published and the step time they measured. It cannot see what
happens around the steps: the request's trip from the ingress to the replica and back, image decoding and
encoding, the requests that arrive after the decision and join the batch (each makes the remaining steps
slower), and processes that compete for the same CPUs or GPU. Those make the measured latency a roughly
constant multiple of the prediction at a given load, and the multiple grows with the load.

`LatencyCalibration` learns that multiple from the requests the router sent to the cloud: after each one,
`observe(expected_ms, measured_ms)` with the prediction made without correction and the latency the
server measured for the whole request. `scale` is the exponentially weighted mean of log(measured /
expected) (`alpha` per observation, so the last ~1/alpha requests dominate), exponentiated and clamped to
[`min_scale`, `max_scale`]. The router multiplies every expected latency by it. A log-space mean is used
so that one outlier (a garbage-collection pause, a replica restart) moves the scale by a bounded factor.

A corrected expectation is a median: half the requests take longer. `margin(quantile)` is the factor
from the median to that quantile, `exp(z * std)` with the exponentially weighted standard deviation of
the log ratios (normal in log space); the router fits a route to the target only when expected x margin
is within it, so the target holds for about that share of requests.

Before any observation the calibration holds a prior: the service model's own expectation (log ratio 0)
with a spread of `prior_log_std`, worth `prior_weight` observations. Each observation weighs 1/(n + 1)
against the evidence of n before it (the prior's included), a plain mean's weight, until that falls to
`alpha` (the evidence is capped at 1/alpha - 1). So the first observation moves the scale halfway to
itself and, by as much as it deviates from the service model, widens the spread: at the start of a burst
after a quiet spell, which is when the router knows least, the first refinement that comes back slow says
that the ones routed after it will meet a queue, and the router cuts their steps at once. Without a prior,
a first observation would either set the scale alone (and with `alpha` alone, hold most of it for the
next ~1/alpha requests, while at a burst's start it is the one request that found the cloud idle) or be
ignored until a few more arrived, and the margin would be 1.0: the router would route a burst's first
requests as if the service model were exact, though it expects them to share batches as small as they
are when routed. With ~1/alpha observations behind it the prior is forgotten.

The scale is learned only from requests the router sent to the cloud, so once it is high enough that every
route falls back to the edge it would never be measured again: a few slow requests at the start of a
burst would keep the cloud unused for the rest of the burst while the edge floods. Evidence
therefore goes stale: once the newest observation is older than `stale_after_s`, the learned log ratio,
its variance and the weight of the evidence decay toward the prior's with half-life `half_life_s`, and
the next observation updates from what is left, with the weight its own evidence then has against the
decayed one. While observations keep arriving the decay does not apply; after a quiet spell the router
trusts the service model again, as much as before any observation, which is also right when the quiet
means the load that caused the multiple has gone.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

from diffusionx.policy.service_model import Arrivals


class ArrivalRate:
    """Refinements the router sent to the cloud over the last `window_s` seconds: their rate and mean
    steps, as `Arrivals` for the service model. Keeps at most `max_events` (a bounded deque: nothing grows
    per request); a rate above `max_events / window_s` is under-counted, far above any tier's capacity.

    The rate is the window's count over its length, or, once `burst_events` or more fell in it, the rate
    since the oldest of them, (n - 1) / its age, when that is higher: at the start of a burst the window
    still holds the quiet before it, and n / window_s would count a tenth of a second of 10/s as 0.5/s, so
    the service model would expect the first requests' batches to stay as small as they are when routed
    (the router's latency calibration, which would correct that, has no evidence yet at a burst's start).
    In steady traffic the two agree on average; the few sparse events a low load brings stay below
    `burst_events`, so two requests that happen to arrive together do not read as a burst."""

    def __init__(
        self,
        window_s: float = 2.0,
        max_events: int = 4096,
        burst_events: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0 or burst_events < 2:
            raise ValueError(f"need window_s > 0 and burst_events >= 2, not {window_s}, {burst_events}")
        self.window_s = window_s
        self.burst_events = burst_events
        self.clock = clock
        self._events: deque[tuple[float, int]] = deque(maxlen=max_events)

    def record(self, cloud_steps: int) -> None:
        if cloud_steps > 0:
            self._events.append((self.clock(), cloud_steps))

    def current(self) -> Arrivals:
        now = self.clock()
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        if not self._events:
            return Arrivals()
        count = len(self._events)
        rate = count / self.window_s
        age = now - self._events[0][0]
        if count >= self.burst_events and age > 0:
            rate = max(rate, (count - 1) / age)
        mean_steps = round(sum(steps for _, steps in self._events) / count)
        return Arrivals(rate, max(1, mean_steps))


@dataclass
class LatencyCalibration:
    alpha: float = 0.1
    min_scale: float = 0.5
    max_scale: float = 8.0
    stale_after_s: float = 2.0  # evidence this old starts to decay (the arrival rate's window)
    half_life_s: float = 5.0  # then halves this often
    prior_log_std: float = 0.15  # the spread of log(measured / expected) assumed before any observation
    prior_weight: float = 1.0  # how many observations the prior is worth
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    samples: int = field(default=0, init=False)
    _log_ratio: float = field(default=0.0, init=False, repr=False)
    _log_variance: float = field(default=0.0, init=False, repr=False)
    _observed_at: float = field(default=0.0, init=False, repr=False)
    _evidence: float = field(default=0.0, init=False, repr=False)  # observations' weight, at most 1/alpha - 1

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in (0, 1]")
        if not 0.0 < self.min_scale <= 1.0 <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= 1 <= max_scale, not {self.min_scale}, {self.max_scale}")
        if self.stale_after_s < 0.0 or self.half_life_s <= 0.0:
            raise ValueError(
                f"need stale_after_s >= 0 and half_life_s > 0, not {self.stale_after_s}, {self.half_life_s}"
            )
        if self.prior_log_std < 0.0 or self.prior_weight < 0.0:
            raise ValueError(
                f"need prior_log_std >= 0 and prior_weight >= 0, not {self.prior_log_std}, "
                f"{self.prior_weight}"
            )
        self._log_variance, self._evidence = self._prior()  # the log ratio's prior is 0: the service model

    def _prior(self) -> tuple[float, float]:
        """The variance and the evidence before any observation (the prior's weight, within the cap)."""
        return self.prior_log_std**2, min(self.prior_weight, self._max_evidence)

    @property
    def _max_evidence(self) -> float:
        return 1.0 / self.alpha - 1.0

    def observe(self, expected_ms: float | None, measured_ms: float) -> None:
        """One request the router sent to the cloud: its uncorrected expected and its measured latency.
        Requests without an expectation (step time not measured yet) or with a non-positive one are
        ignored."""
        if expected_ms is None or expected_ms <= 0.0 or measured_ms <= 0.0:
            return
        ratio = math.log(measured_ms / expected_ms)
        # exponentially weighted mean and variance (West's incremental form) from the decayed state, each
        # observation weighing as in a plain mean against the evidence before it (module docstring)
        log_ratio, log_variance, evidence = self._current()
        weight = 1.0 / (evidence + 1.0)
        deviation = ratio - log_ratio
        self._log_ratio = log_ratio + weight * deviation
        self._log_variance = (1 - weight) * (log_variance + weight * deviation**2)
        self._evidence = min(evidence + 1.0, self._max_evidence)
        self._observed_at = self.clock()
        self.samples += 1

    def _current(self) -> tuple[float, float, float]:
        """The learned log ratio, variance and evidence weight, decayed toward the prior's by the staleness
        of the newest observation."""
        stale_s = self.clock() - self._observed_at - self.stale_after_s
        if stale_s <= 0.0:
            return self._log_ratio, self._log_variance, self._evidence
        kept = 0.5 ** (stale_s / self.half_life_s)  # the prior's own state decays to itself
        variance, evidence = self._prior()
        return (
            self._log_ratio * kept,
            variance + (self._log_variance - variance) * kept,
            evidence + (self._evidence - evidence) * kept,
        )

    def margin(self, quantile: float) -> float:
        """The factor from the corrected (median) expectation to its `quantile` (at most `max_scale`)."""
        if not 0.5 <= quantile < 1.0:
            raise ValueError(f"quantile={quantile} must be in [0.5, 1)")
        z = NormalDist().inv_cdf(quantile)
        return min(self.max_scale, math.exp(z * math.sqrt(self._current()[1])))

    @property
    def scale(self) -> float:
        """The factor to multiply expected latencies by."""
        return min(self.max_scale, max(self.min_scale, math.exp(self._current()[0])))
