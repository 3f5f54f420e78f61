"""The leading-indicator cloud policy and the session activity it reads: fake contexts, injected clocks."""

from __future__ import annotations

import math

import pytest
from ray.serve import autoscaling_policy as serve_policy
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

from diffusionx.policy.ahead import (
    DEFAULT_LEAD_CV,
    SESSION_STARTS_PER_S,
    AheadPolicy,
    finalize_rates,
    session_stats,
)
from diffusionx.policy.autoscaling import QueuedStepsPolicy
from diffusionx.policy.sessions import AGE_BIN_S, AGE_BINS, SessionActivity, SessionTracker, merge_activity
from tests.unit.test_autoscaling_policy import config, context, replica

AHEAD_PATH = "diffusionx.policy.ahead:AheadPolicy"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_tracker_follows_sessions_by_preview_ids_and_measures_share_lead_and_steps():
    clock = Clock()
    tracker = SessionTracker(idle_s=30.0, mature_s=60.0, clock=clock, wall_clock=clock)
    tracker.preview("a1")  # session A starts at 100
    tracker.preview("b1")  # session B starts at 100
    clock.now = 110.0
    tracker.preview("a2", parent_id="a1")  # A's second round
    assert tracker.activity().previewing == 2
    clock.now = 120.0
    tracker.finalize("a2", cloud_steps=10)  # A finalizes 20 s after its first preview
    activity = tracker.activity()
    assert activity.previewing == 1 and activity.finalize_steps == 10.0
    # share and lead wait for the cohort to mature: B may still finalize, later than A
    assert (activity.finalize_share, activity.preview_to_finalize_s, activity.measured_sessions) == (0, 0, 0)
    tracker.finalize("a2", cloud_steps=6)  # a retry of the same finalize: steps count, the session once
    clock.now = 131.0  # B idle for 31 s: abandoned
    assert tracker.activity().previewing == 0
    clock.now = 160.0  # A and B started 60 s ago: measured
    activity = tracker.activity()
    assert activity.finalize_share == pytest.approx(0.5) and activity.measured_sessions == 2
    assert activity.preview_to_finalize_s == pytest.approx(20.0)
    assert activity.finalize_steps == pytest.approx(8.0) and activity.taken_at == 160.0


def test_a_rising_load_does_not_read_the_lead_from_its_quickest_sessions():
    """Sessions start every second, and each finalizes 60 s later, but one in ten only 10 s later: at
    70 s only quick ones and a few slow ones have finalized; whole cohorts give the lead the load has."""
    clock = Clock()
    tracker = SessionTracker(idle_s=70.0, mature_s=90.0, clock=clock, wall_clock=clock)
    finalizes: dict[float, str] = {}
    for second in range(200):
        clock.now = 100.0 + second
        if clock.now in finalizes:
            tracker.finalize(finalizes.pop(clock.now), cloud_steps=10)
        if second < 100:
            tracker.preview(f"s{second}")
            finalizes[clock.now + (10.0 if second % 10 == 0 else 60.0)] = f"s{second}"
        if second == 70:
            assert tracker.activity().preview_to_finalize_s == 0.0  # no cohort has matured yet
    activity = tracker.activity()
    assert activity.preview_to_finalize_s == pytest.approx(0.9 * 60.0 + 0.1 * 10.0, abs=0.5)
    assert activity.finalize_share == 1.0 and activity.measured_sessions == 100


def test_merged_activity_adds_sessions_and_weights_figures_by_them():
    one = SessionActivity(previewing=3, finalize_share=1.0, preview_to_finalize_s=10.0, finalize_steps=8.0)
    two = SessionActivity(previewing=1, finalize_share=0.5, preview_to_finalize_s=30.0, taken_at=5.0)
    merged = merge_activity([one, two])
    assert merged.previewing == 4 and merged.taken_at == 5.0
    assert merged.finalize_share == pytest.approx((3 * 1.0 + 0.5) / 4)
    assert merged.preview_to_finalize_s == pytest.approx(15.0) and merged.finalize_steps == 8.0
    assert merge_activity([]) == SessionActivity()


def steady_ages(sessions: int, lead_s: float) -> tuple[int, ...]:
    """`sessions` previewing at a steady start rate, as `SessionTracker` bins them by age: a session
    of age a is still open with the lead's survival S(a) (normal, the policy's default spread)."""
    sd = max(DEFAULT_LEAD_CV * lead_s, AGE_BIN_S)
    weights = [
        0.5 * math.erfc(((i + 0.5) * AGE_BIN_S - lead_s) / (sd * math.sqrt(2))) for i in range(AGE_BINS)
    ]
    return tuple(round(sessions * w / sum(weights)) for w in weights) if lead_s > 0 else ()


def previewing(
    sessions: int,
    share: float = 1.0,
    lead_s: float = 20.0,
    steps: float = 10.0,
    measured: int = 0,
    aged_by_lead_s: float | None = None,  # the lead the sessions' ages follow (default: lead_s, or 20 s)
) -> dict:
    ages = steady_ages(sessions, aged_by_lead_s or lead_s or 20.0)
    return session_stats(
        SessionActivity(sessions, share, lead_s, steps, measured_sessions=measured, previewing_by_age=ages)
    )


def test_policy_scales_for_the_coming_finalizes_before_any_work_arrives():
    """An idle tier (nothing held, nothing ongoing) with 80 sessions previewing: the reactive policies
    see nothing; the forecast asks for the replicas their finalizes will need."""
    idle = {"a": {**replica(0, 0, step_s=0.1, batch=8), **previewing(80)}}
    ctx = context(idle, ongoing=0.0)
    assert replica_queue_length_autoscaling_policy(ctx)[0] == 0.0
    assert QueuedStepsPolicy(target_wait_s=4.0)(ctx)[0] == 0.0
    # steady state (Little's law): 80 sessions x 1.0 finalize / 20 s = 4 finalizes/s x 10 steps x
    # t(8)=0.1 s / 8 = 0.5 replica-s/s, at 50% planned utilization: 1 replica (to the age bins' rounding)
    desired, state = AheadPolicy(target_wait_s=4.0, target_utilization=0.5)(ctx)
    assert desired == pytest.approx(1.0, rel=0.03) and state["finalizes_per_s"] == pytest.approx(
        4.0, rel=0.03
    )
    doubled = context({"a": {**replica(0, 0, step_s=0.1, batch=8), **previewing(160)}})
    desired, _ = AheadPolicy(target_wait_s=4.0, target_utilization=0.5)(doubled)
    assert desired == pytest.approx(2.0, rel=0.03)


def test_policy_takes_the_reactive_answer_when_the_work_held_needs_more():
    busy = {"a": {**replica(8, 40, step_s=0.1), **previewing(8)}, "b": {**replica(8, 40), **previewing(8)}}
    ctx = context(busy)
    assert AheadPolicy(target_wait_s=4.0)(ctx)[0] == pytest.approx(
        QueuedStepsPolicy(target_wait_s=4.0)(ctx)[0]
    )


@pytest.mark.parametrize(
    "missing", [{"sessions": 0}, {"share": 0.0}, {"lead_s": 0.0}, {"steps": 0.0}], ids=lambda m: next(iter(m))
)
def test_no_forecast_until_share_lead_and_steps_are_measured(missing):
    ctx = context({"a": {**replica(0, 0), **previewing(**{"sessions": 50, **missing})}})
    desired, state = AheadPolicy()(ctx)
    assert desired == 0.0 and state["forecast_replicas"] == 0.0


def test_without_session_metrics_it_is_the_work_policy():
    ctx = context({"a": replica(8, 40), "b": replica(8, 40)})
    assert AheadPolicy(target_wait_s=4.0)(ctx)[0] == QueuedStepsPolicy(target_wait_s=4.0)(ctx)[0]
    assert AheadPolicy()(context({}, current=2)) == (2, {})


@pytest.mark.parametrize(
    "kwargs", [{"target_utilization": 0}, {"target_utilization": 1.5}, {"target_wait_s": -1}]
)
def test_bad_kwargs_name_the_field(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AheadPolicy(**kwargs)


def test_serve_scales_up_after_the_upscale_delay_and_down_only_after_the_downscale_delay(monkeypatch):
    """Through Serve's own wrapper and delays, on an injected clock: sessions ramp up while the tier is
    still idle -> up after upscale_delay_s; sessions stop -> down after downscale_delay_s."""
    clock = {"now": 1000.0}
    monkeypatch.setattr(serve_policy.time, "time", lambda: clock["now"])
    kwargs = {"target_wait_s": 4.0, "target_utilization": 0.5}
    cfg = config(policy={"policy_function": AHEAD_PATH, "policy_kwargs": kwargs})
    policy = serve_policy._apply_autoscaling_config(_resolve_policy_callable(cfg.policy))
    state: dict = {}
    decisions = []
    for _ in range(3):  # t = 1000, 1005, 1010: 240 sessions previewing -> 3 replicas, nothing held yet
        ctx = context({"a": {**replica(0, 0, step_s=0.1), **previewing(240)}}, current=1, cfg=cfg,
                      policy_state=state)  # fmt: skip
        decision, state = policy(ctx)
        decisions.append(decision)
        clock["now"] += 5.0
    assert decisions == [1, 1, 3]
    quiet = {name: {**replica(0, 0), **previewing(0)} for name in "abc"}
    decisions = []
    for _ in range(13):  # 60 s of no sessions at 5 s ticks
        decision, state = policy(context(quiet, current=3, cfg=cfg, policy_state=state))
        decisions.append(decision)
        clock["now"] += 5.0
    assert decisions[:12] == [3] * 12 and decisions[12] == 1


def test_priors_stand_in_until_the_ingress_has_measured_a_finalize():
    """No finalize seen yet (share, lead and steps 0): the priors give the forecast; measured figures are
    weighed against them by the sessions they rest on, a prior weighing as `prior_sessions`."""
    fresh = context({"a": {**replica(0, 0, step_s=0.1, batch=8), **previewing(80, 0.0, 0.0, 0.0)}})
    assert AheadPolicy(target_utilization=0.5)(fresh)[1]["forecast_replicas"] == 0.0
    priors = {"prior_finalize_share": 1.0, "prior_preview_to_finalize_s": 20.0, "prior_finalize_steps": 10.0}
    # as the first test: 80 / 20 s x 10 steps x 0.1 s / 8 at 50% -> 1 replica
    assert AheadPolicy(target_utilization=0.5, **priors)(fresh)[0] == pytest.approx(1.0, rel=0.03)

    def measured(sessions: int) -> object:
        stats = previewing(80, 1.0, 40.0, 10.0, sessions)
        return context({"a": {**replica(0, 0, step_s=0.1, batch=8), **stats}})

    # a lead of 40 s measured on 50 sessions against the prior's 20 s weighing as 50: read as 30 s
    policy = AheadPolicy(target_utilization=0.5, prior_sessions=50.0, **priors)
    thirty = {**priors, "prior_preview_to_finalize_s": 30.0}
    read_as_30 = {**replica(0, 0, step_s=0.1, batch=8), **previewing(80, 0.0, 0.0, 0.0, aged_by_lead_s=40.0)}
    assert policy(measured(50))[0] == pytest.approx(
        AheadPolicy(target_utilization=0.5, **thirty)(context({"a": read_as_30}))[0]
    )
    assert policy(measured(100_000))[0] == pytest.approx(0.5, rel=0.03)  # many sessions: the measured lead
    assert AheadPolicy(target_utilization=0.5)(measured(1))[0] == pytest.approx(0.5, rel=0.03)  # no prior
    with pytest.raises(ValueError, match="prior_finalize_share"):
        AheadPolicy(prior_finalize_share=2.0)
    with pytest.raises(ValueError, match="prior_preview_to_finalize_s"):
        AheadPolicy(prior_preview_to_finalize_s=-1.0)


def test_tracker_measures_the_rate_sessions_start_over_its_window():
    clock = Clock()
    tracker = SessionTracker(rate_window_s=10.0, clock=clock, wall_clock=clock)
    for i in range(5):  # 5 sessions at 100..104, an edit that starts none
        clock.now = 100.0 + i
        tracker.preview(f"s{i}")
    tracker.preview("s0-edit", parent_id="s0")
    assert tracker.activity().starts_per_s == pytest.approx(0.5)
    clock.now = 112.5  # the starts at 100, 101 and 102 are older than 10 s
    assert tracker.activity().starts_per_s == pytest.approx(0.2)
    merged = merge_activity([tracker.activity(), SessionActivity(starts_per_s=1.0)])
    assert merged.starts_per_s == pytest.approx(1.2)


def test_sessions_starting_now_count_only_once_they_can_finalize_within_the_horizon():
    """6 sessions start per second on an idle tier (none older): with a 60 s lead they finalize a minute
    from now, so a 10 s horizon (a replica asked for now serves in 10 s) asks for nothing yet, and a
    horizon beyond the lead's spread plans for all 6/s."""
    rising = {**replica(0, 0, step_s=0.1, batch=8), **previewing(0, lead_s=60.0), SESSION_STARTS_PER_S: 6.0}
    priors = {"prior_finalize_share": 1.0, "prior_preview_to_finalize_s": 60.0, "prior_finalize_steps": 10.0}
    near = AheadPolicy(target_utilization=0.5, horizon_s=10.0, **priors)(context({"a": rising}))
    assert near[1]["finalizes_per_s"] < 0.06  # 1% of them: the normal lead's tail
    far = AheadPolicy(target_utilization=0.5, horizon_s=120.0, **priors)(context({"a": rising}))
    # 6/s x 10 steps x 0.1 s / 8 = 0.75 replica-s per s, at 50%: 1.5 replicas
    assert far[1]["finalizes_per_s"] == pytest.approx(6.0, rel=0.01) and far[0] == pytest.approx(
        1.5, rel=0.01
    )


def test_once_sessions_stop_starting_the_older_ones_keep_finalizing_at_the_same_rate():
    """Sessions started at 1/s and finalize 60 s (sd 5 s) later; none has started for 30 s, so 30 remain,
    aged 30-60 s. Little's law over the sessions previewing (30 / 60 s) would read 0.5/s and give
    replicas back; they still finalize at 1/s for the next 30 s, then stop."""
    ages = [0] * AGE_BINS
    for age in range(30, 60):
        ages[int(age / AGE_BIN_S)] += 1
    rates = finalize_rates(ages, share=1.0, lead_s=60.0, lead_sd_s=5.0, starts_per_s=0.0, horizon_s=60.0)
    assert max(rates[:5]) == pytest.approx(1.0, abs=0.15) and min(rates[1:5]) > 0.8  # the next 25 s
    assert max(rates[8:]) < 0.1  # 40 s on, all have finalized
    assert sum(rates) * AGE_BIN_S == pytest.approx(30.0, rel=0.02)  # each once


def test_sessions_long_past_the_lead_are_mostly_ones_that_will_not_finalize():
    """Half the sessions finalize, 60 s (sd 5 s) after their start; the rest idle until they expire. 20
    sessions aged 100 s are the abandoning ones: no finalize is due from them; with a share of 1 they
    are overdue finalizes, due now."""
    ages = [0] * AGE_BINS
    ages[20] = 20  # aged 100-105 s
    half = finalize_rates(ages, share=0.5, lead_s=60.0, lead_sd_s=5.0, starts_per_s=0.0, horizon_s=30.0)
    assert max(half) < 1e-6
    every = finalize_rates(ages, share=1.0, lead_s=60.0, lead_sd_s=5.0, starts_per_s=0.0, horizon_s=30.0)
    assert every[0] * AGE_BIN_S == pytest.approx(20.0) and max(every[1:]) == 0.0


def test_tracker_bins_the_sessions_previewing_by_age_and_measures_the_leads_spread():
    clock = Clock()
    tracker = SessionTracker(idle_s=100.0, mature_s=60.0, clock=clock, wall_clock=clock)
    tracker.preview("a1")  # at 100
    clock.now = 112.0
    tracker.preview("b1")
    tracker.preview("a2", parent_id="a1")  # an edit joins A: A stays aged from its first preview
    clock.now = 120.0
    activity = tracker.activity()
    assert len(activity.previewing_by_age) == AGE_BINS
    assert activity.previewing_by_age[int(20 / AGE_BIN_S)] == 1 and activity.previewing_by_age[1] == 1
    tracker.finalize("a2", cloud_steps=10)  # lead 20 s
    clock.now = 142.0
    tracker.finalize("b1", cloud_steps=10)  # lead 30 s
    clock.now = 180.0  # both mature
    activity = tracker.activity()
    assert sum(activity.previewing_by_age) == 0 and activity.preview_to_finalize_sd_s == pytest.approx(5.0)
    # across processes the bins travel as a list; merged, they add up bin by bin
    assert SessionActivity(**tracker.activity().to_dict()) == activity
    one, two = SessionActivity(previewing_by_age=(1, 2)), SessionActivity(previewing_by_age=(3, 0, 1))
    assert merge_activity([one, two]).previewing_by_age == (4, 2, 1)
