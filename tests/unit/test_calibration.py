"""The router's online latency calibration: learns measured / expected, and the router cuts by it."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest

from diffusionx.policy.calibration import ArrivalRate, LatencyCalibration
from diffusionx.policy.router import CloudLoad, RouterConfig, decide_route
from diffusionx.policy.service_model import Arrivals, ReplicaLoad, expected_finish_s

CONFIG = RouterConfig(min_steps=10, strength_floor=0.2, overhead_ms=50.0)
IDLE = CloudLoad((ReplicaLoad(pool=(), max_batch_size=4, step_time_s=(0.05, 0.0)),))


def test_the_first_observations_are_weighed_against_the_service_models_expectation():
    calibration = LatencyCalibration(alpha=0.1, prior_weight=1.0)
    assert calibration.scale == 1.0  # before any observation: the service model's own expectation
    for n in (1, 2, 3):  # n observations of 2x against the prior's one of 1x: the log-mean 2^(n / (n + 1))
        calibration.observe(100.0, 200.0)
        assert calibration.scale == pytest.approx(2 ** (n / (n + 1))) and calibration.samples == n


def test_scale_follows_the_recent_ratio_in_log_space_and_is_clamped():
    calibration = LatencyCalibration(alpha=0.5, max_scale=3.0)
    calibration.observe(100.0, 100.0)
    calibration.observe(100.0, 400.0)  # log-mean of 1 and 4 at alpha 0.5: 2
    assert calibration.scale == pytest.approx(2.0)
    for _ in range(20):
        calibration.observe(100.0, 1000.0)
    assert calibration.scale == 3.0  # clamped
    for _ in range(60):
        calibration.observe(100.0, 80.0)
    assert calibration.scale == pytest.approx(0.8, rel=1e-3)  # back down once the load is gone


def test_thin_evidence_weighs_as_a_plain_mean_until_alpha_takes_over():
    # a burst's first request found the cloud idle; the next ones meet its queue
    calibration = LatencyCalibration(alpha=0.1)
    for measured in (100.0, 200.0, 200.0):
        calibration.observe(100.0, measured)
    # the log-mean of the prior's 1 and the observed 1, 2, 2 (alpha alone, from the first: 1.14)
    assert calibration.scale == pytest.approx(2 ** (2 / 4))
    for _ in range(30):
        calibration.observe(100.0, 200.0)
    before = math.log(calibration.scale)
    calibration.observe(100.0, 400.0)  # with ~1/alpha observations behind it, one moves the mean by alpha
    assert math.log(calibration.scale) == pytest.approx(before + 0.1 * (math.log(4.0) - before))


def test_requests_without_an_expectation_are_ignored():
    calibration = LatencyCalibration()
    calibration.observe(None, 500.0)
    calibration.observe(0.0, 500.0)
    assert calibration.samples == 0 and calibration.scale == 1.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        LatencyCalibration(alpha=0.0)
    with pytest.raises(ValueError, match="min_scale"):
        LatencyCalibration(min_scale=2.0)


def test_stale_evidence_decays_toward_the_service_model_so_the_router_measures_the_cloud_again():
    now = [0.0]
    calibration = LatencyCalibration(alpha=0.5, stale_after_s=2.0, half_life_s=5.0, clock=lambda: now[0])
    for t in (0.0, 0.1, 0.2):  # a slow start: measured 6x the expectation, with some spread
        now[0] = t
        calibration.observe(100.0, 600.0 if t != 0.1 else 300.0)
    learned, margin = calibration.scale, calibration.margin(0.99)
    assert learned > 4.0 and margin > 1.5

    def route() -> str:
        scale, margin = calibration.scale, calibration.margin(0.99)
        return decide_route(1.0, 20, IDLE, 1500, CONFIG, latency_scale=scale, latency_margin=margin).route

    assert route() == "edge-fallback"  # nothing fits: no cloud request, so no new observation
    now[0] = 2.2  # fresh while within stale_after_s of the newest observation
    assert calibration.scale == pytest.approx(learned) and calibration.margin(0.99) == pytest.approx(margin)
    now[0] = 2.2 + 5.0  # one half-life later: half the log ratio; the spread on its way to the prior's
    assert calibration.scale == pytest.approx(math.sqrt(learned))
    prior_margin = math.exp(NormalDist().inv_cdf(0.99) * calibration.prior_log_std)
    assert prior_margin < calibration.margin(0.99) < margin
    now[0] = 2.2 + 30.0
    assert calibration.scale == pytest.approx(1.0, abs=0.05) and route() != "edge-fallback"  # measured again
    assert calibration.margin(0.99) == pytest.approx(prior_margin, rel=0.05)
    # the next observation updates from what is left, not from the stale 6x (decayed 6 half-lives), and
    # weighs as one observation against the evidence left, the prior's one (alpha 0.5 caps it there)
    calibration.observe(100.0, 120.0)
    left = math.log(learned) * 0.5**6
    assert math.log(calibration.scale) == pytest.approx(left + 0.5 * (math.log(1.2) - left), rel=1e-6)
    with pytest.raises(ValueError, match="half_life_s"):
        LatencyCalibration(half_life_s=0.0)


def test_router_cuts_by_the_calibrated_latency_and_reports_the_scale():
    # 20 steps at 50 ms + 50 ms overhead = 1050 ms: fits 1500 ms uncorrected
    plain = decide_route(1.0, 20, IDLE, 1500, CONFIG)
    assert plain.route == "cloud" and plain.expected_latency_ms == pytest.approx(1050)
    # measured latencies twice the expected: the same request no longer fits, so steps are cut
    calibrated = decide_route(1.0, 20, IDLE, 1500, CONFIG, latency_scale=2.0)
    assert calibrated.route == "cloud-reduced" and calibrated.num_inference_steps < 20
    assert calibrated.expected_latency_ms <= 1500 and calibrated.latency_scale == 2.0
    expected_steps = calibrated.cloud_steps
    assert calibrated.uncorrected_latency_ms == pytest.approx(expected_steps * 50 + 50)
    assert math.isclose(calibrated.expected_latency_ms, 2.0 * calibrated.uncorrected_latency_ms)


def test_arrival_rate_counts_the_window_and_forgets_older_events():
    now = [0.0]
    rate = ArrivalRate(window_s=2.0, clock=lambda: now[0])
    assert rate.current() == Arrivals()
    for t, steps in ((0.0, 10), (0.5, 20), (1.0, 0), (1.5, 30)):  # a 0-step route (edge) is not cloud work
        now[0] = t
        rate.record(steps)
    assert rate.current() == Arrivals(3 / 2.0, 20)
    now[0] = 2.2  # the event at 0.0 left the window
    assert rate.current() == Arrivals(2 / 2.0, 25)
    now[0] = 10.0
    assert rate.current() == Arrivals()
    with pytest.raises(ValueError, match="burst_events"):
        ArrivalRate(burst_events=1)


def test_arrival_rate_at_a_bursts_start_is_the_rate_since_it_began():
    now = [0.0]
    rate = ArrivalRate(window_s=2.0, burst_events=4, clock=lambda: now[0])
    for t in (10.0, 10.1, 10.2):  # three at once after a quiet spell: not yet a burst
        now[0] = t
        rate.record(20)
    assert rate.current() == Arrivals(3 / 2.0, 20)
    now[0] = 10.3
    rate.record(20)
    assert rate.current() == Arrivals(pytest.approx(3 / 0.3), 20)  # 10/s, not the window's 4 / 2 s
    for tenth in range(104, 124):  # the burst goes on at 10/s until the window holds nothing else
        now[0] = tenth / 10
        rate.record(20)
    now[0] = 12.35  # 20 events in the window: the window's 10/s (their span says 19 / 1.95 s)
    assert rate.current() == Arrivals(pytest.approx(10.0), 20)


def test_replay_with_arrivals_is_the_exact_replay_when_none_come():
    busy = ReplicaLoad(
        pool=((3, 3), (8, 8), (12, 12)), queued=(6,), max_batch_size=2, step_time_s=(0.02, 0.01)
    )
    for steps in (1, 5, 10, 20):
        exact = expected_finish_s(busy, steps)
        assert expected_finish_s(busy, steps, arrivals=Arrivals(1e-9, 5)) == pytest.approx(exact)


def test_later_arrivals_slow_a_batch_that_is_not_full_and_shorter_ones_pass():
    idle = ReplicaLoad(pool=(), max_batch_size=8, step_time_s=(0.01, 0.01))  # t(b) = 10 ms + 10 ms * b
    alone = expected_finish_s(idle, 20)
    assert alone == pytest.approx(20 * 0.02)
    # 50 requests a second of 20 steps: the batch grows while the new one runs, every step gets slower
    joined = expected_finish_s(idle, 20, arrivals=Arrivals(50.0, 20))
    assert joined > alone * 1.5
    # shorter ones (5 steps) pass the new request in a full batch: later still than equal-length ones
    full = ReplicaLoad(pool=(), max_batch_size=1, step_time_s=(0.01, 0.0))
    assert expected_finish_s(full, 20, arrivals=Arrivals(50.0, 5)) > expected_finish_s(
        full, 20, arrivals=Arrivals(50.0, 40)
    )
    assert expected_finish_s(full, 20, arrivals=Arrivals(50.0, 40)) == pytest.approx(20 * 0.01)


def test_router_cuts_earlier_when_cloud_work_keeps_arriving():
    # a CPU-like replica: a batched step costs about the sum of its samples (t(b) = 5 ms + 45 ms * b)
    idle = CloudLoad((ReplicaLoad(pool=(), max_batch_size=8, step_time_s=(0.005, 0.045)),))
    quiet = decide_route(1.0, 20, idle, 1200, CONFIG)
    assert quiet.route == "cloud"
    busy = decide_route(1.0, 20, idle, 1200, CONFIG, arrivals=Arrivals(10.0, 20))
    assert busy.route in ("cloud-reduced", "edge-fallback")


def test_margin_grows_with_the_spread_of_the_ratios_and_the_router_keeps_it():
    steady = LatencyCalibration(alpha=0.2)
    noisy = LatencyCalibration(alpha=0.2)
    for i in range(40):
        steady.observe(100.0, 150.0)
        noisy.observe(100.0, 100.0 if i % 2 else 225.0)  # the same log-mean (1.5x), spread out
    # no spread observed: the prior's and the first observations' deviations from it are forgotten
    assert steady.scale == pytest.approx(1.5, rel=1e-3) and steady.margin(0.9) == pytest.approx(1.0, abs=0.01)
    assert noisy.margin(0.9) > 1.3 and noisy.margin(0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="quantile"):
        noisy.margin(1.0)
    # 1050 ms expected fits 1500 ms, but not with a 1.5x margin to the 90th percentile
    assert decide_route(1.0, 20, IDLE, 1500, CONFIG).route == "cloud"
    decision = decide_route(1.0, 20, IDLE, 1500, CONFIG, latency_margin=1.5)
    assert decision.route == "cloud-reduced" and decision.expected_latency_ms * 1.5 <= 1500


def test_without_evidence_the_margin_is_the_prior_spreads_and_a_first_surprise_widens_it():
    # the start of a burst after a quiet spell: no observation yet, so nothing says the service model is
    # exact, and a route that fits the target only as a point estimate is cut
    z99 = NormalDist().inv_cdf(0.99)
    fresh = LatencyCalibration(prior_log_std=0.15, prior_weight=1.0)
    assert fresh.scale == 1.0 and fresh.margin(0.99) == pytest.approx(math.exp(z99 * 0.15))
    # 1050 ms expected fits 1250 ms as a median, not with the prior margin (1.42x) to the 99th percentile
    assert decide_route(1.0, 20, IDLE, 1250, CONFIG).route == "cloud"
    decision = decide_route(1.0, 20, IDLE, 1250, CONFIG, latency_margin=fresh.margin(0.99))
    assert decision.route == "cloud-reduced" and decision.expected_latency_ms * fresh.margin(0.99) <= 1250
    # a first observation as expected narrows the spread; one at twice the expectation (the first
    # refinement of a burst coming back slow) moves the scale halfway and widens the spread by its surprise
    agreed, surprised = LatencyCalibration(), LatencyCalibration()
    agreed.observe(100.0, 100.0)
    surprised.observe(100.0, 200.0)
    assert agreed.scale == 1.0 and agreed.margin(0.99) == pytest.approx(
        math.exp(z99 * math.sqrt(0.15**2 / 2))
    )
    assert surprised.scale == pytest.approx(math.sqrt(2.0))
    spread = math.sqrt(0.5 * (0.15**2 + 0.5 * math.log(2.0) ** 2))
    assert surprised.margin(0.99) == pytest.approx(math.exp(z99 * spread))  # 2.3x: with the scale, 3.3x
    with pytest.raises(ValueError, match="prior_weight"):
        LatencyCalibration(prior_weight=-1.0)
