"""Autoscaling the cloud tier ahead of the finalizes that the sessions now previewing will bring.

Why. A reactive policy (Serve's default on ongoing requests, or `QueuedStepsPolicy` on the work held) sees
a wave of finalizes only once it has arrived, while a GPU node takes minutes to come. In DiffusionX
finalizes do not come from nowhere: a session previews for several rounds on the edge tier first, so the
sessions previewing now announce the cloud work of the next minutes.

Signal. The ingress follows sessions (`diffusionx.policy.sessions.SessionTracker`) and publishes their
activity; every cloud replica reports it with its own work through Serve's custom autoscaling metrics
(`session_stats`, next to `autoscaling_stats`): `N` sessions previewing, the measured share `f` of sessions
that finalize, the measured mean time `L` from a session's first preview to its finalize, and the measured
mean cloud steps `s` of a finalize, and the rate `r` at which sessions start now (over the tracker's last
`rate_window_s`). The replicas report their step time at a full batch, `t(B)`.

Decision (`AheadPolicy`, a Serve custom policy like `QueuedStepsPolicy`). The previewing sessions will
finalize at about `f * N / L` per second on average over the next `L` seconds (Little's law: `N` sessions
that each take `L` seconds to reach their finalize started at `N / L` per second), and the sessions
starting now bring `f * r` finalizes per second `L` seconds from now. The forecast plans for the higher,
`lambda = f * max(N / L, r)`: on a rising load the finalize rate that arrives a lead from now (a replica
must be up by then: the mean over the lead alone lags by half a lead), on a falling one the sessions still
previewing, so the forecast decays as they finalize. Each finalize costs `s` steps
in batches of `B`, `s * t(B) / B` replica-seconds, so serving them takes
`forecast = lambda * s * t(B) / B / target_utilization` replicas, where `target_utilization` (< 1) leaves
room for part-full batches and the latency target. The policy asks for
`max(forecast, work held / target_wait_s)`: the forecast scales up before the finalizes arrive, the
reactive term (QueuedStepsPolicy's) covers work the forecast missed, and when sessions stop previewing the
forecast falls and the tier scales down as the reactive policy would, after Serve's `downscale_delay_s`.
Until `f` and `L` are measured (on whole cohorts of sessions, `SessionTracker`'s `mature_s` after their
start) and `s` (no finalize seen yet) the policy uses its priors (`prior_*` kwargs: what the operator
measured on earlier traffic, e.g. the ingress's figures of yesterday; 0 = none), then the measured figures
weighed against the priors by the sessions they rest on (a prior weighs as `prior_sessions`); without a
prior the forecast is 0: a fresh deployment otherwise scales reactively until its first cohort matures.

This module imports nothing from Ray and is tested with fake contexts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusionx.policy.autoscaling import FULL_BATCH_STEP_S, MAX_BATCH_SIZE, held_work
from diffusionx.policy.sessions import SessionActivity

# names of the session metrics every cloud replica reports (the same merged view from each)
PREVIEWING_SESSIONS = "previewing_sessions"
FINALIZE_SHARE = "finalize_share"
PREVIEW_TO_FINALIZE_S = "preview_to_finalize_s"
FINALIZE_STEPS = "finalize_steps"
SESSION_STARTS_PER_S = "session_starts_per_s"
MEASURED_SESSIONS = "measured_sessions"


def session_stats(activity: SessionActivity) -> dict[str, float]:
    """What a cloud replica adds to its `record_autoscaling_stats` from the ingress's session activity."""
    return {
        PREVIEWING_SESSIONS: float(activity.previewing),
        FINALIZE_SHARE: float(activity.finalize_share),
        PREVIEW_TO_FINALIZE_S: float(activity.preview_to_finalize_s),
        FINALIZE_STEPS: float(activity.finalize_steps),
        SESSION_STARTS_PER_S: float(activity.starts_per_s),
        MEASURED_SESSIONS: float(activity.measured_sessions),
    }


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
    # used until the ingress has measured them (module docstring); 0 = no prior
    prior_finalize_share: float = 0.0
    prior_preview_to_finalize_s: float = 0.0
    prior_finalize_steps: float = 0.0
    prior_sessions: float = 50.0  # how many measured sessions a prior weighs as, against the measured figures

    def __post_init__(self) -> None:
        for name in ("target_wait_s", "default_step_s", "target_utilization", "prior_sessions"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is not allowed: use a number > 0")
        if self.target_utilization > 1:
            raise ValueError(f"target_utilization={self.target_utilization!r} is not allowed: use (0, 1]")
        for name in ("prior_finalize_share", "prior_preview_to_finalize_s", "prior_finalize_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} is not allowed: use a number >= 0 (0: no prior)")
        if self.prior_finalize_share > 1:
            raise ValueError(f"prior_finalize_share={self.prior_finalize_share!r} is not allowed: use [0, 1]")

    def forecast(self, metrics: Mapping[str, Mapping[Any, float]], step_s: float) -> tuple[float, float]:
        """(replicas the coming finalizes need, their expected arrival rate per second)."""
        sessions = _latest(metrics, PREVIEWING_SESSIONS)
        measured = _latest(metrics, MEASURED_SESSIONS)
        share = self._with_prior(_latest(metrics, FINALIZE_SHARE), self.prior_finalize_share, measured)
        lead_s = self._with_prior(
            _latest(metrics, PREVIEW_TO_FINALIZE_S), self.prior_preview_to_finalize_s, measured
        )
        steps = _latest(metrics, FINALIZE_STEPS) or self.prior_finalize_steps
        starts = _latest(metrics, SESSION_STARTS_PER_S)
        if min(share, lead_s, steps) <= 0 or max(sessions, starts) <= 0:
            return 0.0, 0.0
        rate = share * max(sessions / lead_s, starts)
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
