"""Autoscaling the cloud tier ahead of the finalizes that the sessions now previewing will bring.

Why. A reactive policy (Serve's default on ongoing requests, or `QueuedStepsPolicy` on the work held) sees
a wave of finalizes only once it has arrived, while a GPU node takes minutes to come. In DiffusionX
finalizes do not come from nowhere: a session previews for several rounds on the edge tier first, so the
sessions previewing now announce the cloud work of the next minutes.

Signal. The ingress follows sessions (`diffusionx.policy.sessions.SessionTracker`) and publishes their
activity; every cloud replica reports it with its own work through Serve's custom autoscaling metrics
(`session_stats`, next to `autoscaling_stats`): the sessions previewing now counted by their age, the
measured share `f` of sessions that finalize, the mean `L` and spread `sd` of the time from a session's
first preview to its finalize (its lead), the mean cloud steps `s` of a finalize, and the rate `r` at which
sessions start now. The replicas report their step time at a full batch, `t(B)`.

Decision (`AheadPolicy`, a Serve custom policy like `QueuedStepsPolicy`). A replica asked for now serves
only after `horizon_s` (a GPU node's provisioning and boot, the model's load, Serve's upscale delay), and
one given back now is missed for as long, so the policy plans for the highest finalize rate of the next
`horizon_s` seconds (`finalize_rates`): a session's lead is taken as normal(`L`, `sd`), and a session open
at age `a` finalizes within `(a + x0, a + x1]` with probability
`f * (S(a + x0) - S(a + x1)) / (1 - f + f * S(a))`, `S` the lead's survival function (a session past the
usual lead is ever more likely one that will not finalize); sessions that start meanwhile at `r` add
`f * r * (1 - S(x))` at `x` seconds from now. On a rising load this asks for replicas a horizon before the
finalizes come, not a whole lead before (the sessions starting now finalize only a lead from now); when
sessions stop starting it keeps the replicas while the older sessions still finalize (their rate stays
up although fewer sessions are previewing) and gives them back as the last ones are due. Each finalize
costs `s` steps in batches of `B`, `s * t(B) / B` replica-seconds, so the peak rate `lambda` takes
`forecast = lambda * s * t(B) / B / target_utilization` replicas, where `target_utilization` (< 1)
leaves room for part-full batches and the latency target. The policy asks for
`max(forecast, work held / target_wait_s)`: the reactive term (QueuedStepsPolicy's) covers work the
forecast missed; Serve's delays apply as to any policy. The forecast already holds every replica the
next `horizon_s` needs (one given back now can be asked for again in time), so `downscale_delay_s` need
only cover the metrics' noise, like `upscale_delay_s` (docs/autoscaling.md).
Until `f`, `L` and `sd` are measured (on whole cohorts of sessions, `SessionTracker`'s `mature_s` after
their start) and `s` (no finalize seen yet) the policy uses its priors (`prior_*` kwargs: what the operator
measured on earlier traffic, e.g. the ingress's figures of yesterday; 0 = none), then the measured figures
weighed against the priors by the sessions they rest on (a prior weighs as `prior_sessions`); without a
prior the forecast is 0: a fresh deployment otherwise scales reactively until its first cohort matures.
Without a measured or prior spread the lead's spread is `DEFAULT_LEAD_CV` of its mean.

This module imports nothing from Ray and is tested with fake contexts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusionx.policy.autoscaling import FULL_BATCH_STEP_S, MAX_BATCH_SIZE, held_work
from diffusionx.policy.sessions import AGE_BIN_S, SessionActivity

# names of the session metrics every cloud replica reports (the same merged view from each)
PREVIEWING_SESSIONS = "previewing_sessions"
FINALIZE_SHARE = "finalize_share"
PREVIEW_TO_FINALIZE_S = "preview_to_finalize_s"
PREVIEW_TO_FINALIZE_SD_S = "preview_to_finalize_sd_s"
PREVIEWING_AGE = "previewing_age_{}"  # sessions previewing in age bin i (AGE_BIN_S wide)
FINALIZE_STEPS = "finalize_steps"
SESSION_STARTS_PER_S = "session_starts_per_s"
MEASURED_SESSIONS = "measured_sessions"

DEFAULT_LEAD_CV = 0.3  # a session's lead varies with its rounds and think times: spread until measured


def session_stats(activity: SessionActivity) -> dict[str, float]:
    """What a cloud replica adds to its `record_autoscaling_stats` from the ingress's session activity."""
    return {
        PREVIEWING_SESSIONS: float(activity.previewing),
        FINALIZE_SHARE: float(activity.finalize_share),
        PREVIEW_TO_FINALIZE_S: float(activity.preview_to_finalize_s),
        FINALIZE_STEPS: float(activity.finalize_steps),
        SESSION_STARTS_PER_S: float(activity.starts_per_s),
        MEASURED_SESSIONS: float(activity.measured_sessions),
        PREVIEW_TO_FINALIZE_SD_S: float(activity.preview_to_finalize_sd_s),
        **{PREVIEWING_AGE.format(i): float(n) for i, n in enumerate(activity.previewing_by_age)},
    }


def finalize_rates(
    by_age: list[float],
    share: float,
    lead_s: float,
    lead_sd_s: float,
    starts_per_s: float,
    horizon_s: float,
) -> list[float]:
    """Expected finalizes per second in each `AGE_BIN_S` interval of the next `horizon_s` seconds, from
    the sessions previewing now (`by_age`: their counts in `AGE_BIN_S` age bins) and those starting at
    `starts_per_s` meanwhile (module docstring)."""
    scale = lead_sd_s * math.sqrt(2.0)

    def survival(x: float) -> float:
        return 0.5 * math.erfc((x - lead_s) / scale)

    intervals = max(1, math.ceil(horizon_s / AGE_BIN_S))
    due = [0.0] * intervals  # expected finalizes in each interval
    for i, count in enumerate(by_age):
        if count <= 0:
            continue
        age = (i + 0.5) * AGE_BIN_S
        still_open = 1.0 - share + share * survival(age)
        if still_open < 1e-12:  # every session finalizes and this one is long overdue: now
            due[0] += count
            continue
        for k in range(intervals):
            x0, x1 = k * AGE_BIN_S, (k + 1) * AGE_BIN_S
            due[k] += count * share * (survival(age + x0) - survival(age + x1)) / still_open
    rates = []
    for k, expected in enumerate(due):
        starting = share * starts_per_s * (1.0 - survival((k + 0.5) * AGE_BIN_S))
        rates.append(expected / AGE_BIN_S + starting)
    return rates


def _latest(metrics: Mapping[str, Mapping[Any, float]], name: str) -> float:
    """One value of a metric that every replica reports alike: the largest (a replica that read the
    activity before the others may lag behind)."""
    return max(metrics.get(name, {}).values(), default=0.0)


@dataclass
class AheadPolicy:
    """Serve custom autoscaling policy: replicas for the finalizes the previewing sessions will bring, at
    least those for the work held (module docstring)."""

    target_wait_s: float = 10.0  # QueuedStepsPolicy's: seconds a replica may need to finish the work it holds
    default_step_s: float = 0.1  # a batched step's seconds before any replica has measured one
    target_utilization: float = 0.7  # share of a replica's full-batch throughput the forecast plans to use
    horizon_s: float = 60.0  # seconds from asking for a replica to its serving (node, boot, load, delay)
    # used until the ingress has measured them (module docstring); 0 = no prior
    prior_finalize_share: float = 0.0
    prior_preview_to_finalize_s: float = 0.0
    prior_finalize_steps: float = 0.0
    prior_preview_to_finalize_sd_s: float = 0.0
    prior_sessions: float = 50.0  # how many measured sessions a prior weighs as, against the measured figures

    def __post_init__(self) -> None:
        for name in ("target_wait_s", "default_step_s", "target_utilization", "horizon_s", "prior_sessions"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is not allowed: use a number > 0")
        if self.target_utilization > 1:
            raise ValueError(f"target_utilization={self.target_utilization!r} is not allowed: use (0, 1]")
        priors = (
            "prior_finalize_share",
            "prior_preview_to_finalize_s",
            "prior_finalize_steps",
            "prior_preview_to_finalize_sd_s",
        )
        for name in priors:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} is not allowed: use a number >= 0 (0: no prior)")
        if self.prior_finalize_share > 1:
            raise ValueError(f"prior_finalize_share={self.prior_finalize_share!r} is not allowed: use [0, 1]")

    def forecast(self, metrics: Mapping[str, Mapping[Any, float]], step_s: float) -> tuple[float, float]:
        """(replicas the coming finalizes need, the highest finalize rate per second of the horizon)."""
        measured = _latest(metrics, MEASURED_SESSIONS)
        share = self._with_prior(_latest(metrics, FINALIZE_SHARE), self.prior_finalize_share, measured)
        lead_s = self._with_prior(
            _latest(metrics, PREVIEW_TO_FINALIZE_S), self.prior_preview_to_finalize_s, measured
        )
        lead_sd_s = self._with_prior(
            _latest(metrics, PREVIEW_TO_FINALIZE_SD_S), self.prior_preview_to_finalize_sd_s, measured
        )
        steps = _latest(metrics, FINALIZE_STEPS) or self.prior_finalize_steps
        starts = _latest(metrics, SESSION_STARTS_PER_S)
        by_age: list[float] = []
        while PREVIEWING_AGE.format(len(by_age)) in metrics:
            by_age.append(_latest(metrics, PREVIEWING_AGE.format(len(by_age))))
        if min(share, lead_s, steps) <= 0 or max(sum(by_age), starts) <= 0:
            return 0.0, 0.0
        lead_sd_s = max(lead_sd_s or DEFAULT_LEAD_CV * lead_s, AGE_BIN_S)  # ages are known to a bin
        rate = max(finalize_rates(by_age, share, lead_s, lead_sd_s, starts, self.horizon_s))
        full = [s for s in metrics.get(FULL_BATCH_STEP_S, {}).values() if s > 0]
        full_batch_s = sum(full) / len(full) if full else step_s
        batch = max(1.0, _latest(metrics, MAX_BATCH_SIZE))
        replica_s_each = steps * full_batch_s / batch
        return rate * replica_s_each / self.target_utilization, rate

    def _with_prior(self, value: float, prior: float, measured: float) -> float:
        """A measured figure weighed against its prior by the sessions it rests on (`prior_sessions` for
        the prior), so the first few mature sessions do not displace what the operator measured."""
        if value <= 0 or prior <= 0:
            return value or prior
        return (measured * value + self.prior_sessions * prior) / (measured + self.prior_sessions)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        held = held_work(ctx, self.default_step_s)
        if held is None:  # no replica has reported yet: hold
            return ctx.target_num_replicas, {}
        reactive = held.work_s / self.target_wait_s
        ahead, rate = self.forecast(ctx.aggregated_metrics or {}, held.step_s)
        return max(reactive, ahead), {
            "work_s": round(held.work_s, 3),
            "waiting_requests": held.waiting_requests,
            "forecast_replicas": round(ahead, 3),
            "finalizes_per_s": round(rate, 3),
        }
