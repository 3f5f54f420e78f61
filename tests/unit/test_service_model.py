"""The cloud tier's service model against a discrete-event simulation of the step batcher's policy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from diffusionx.policy.load import TierSnapshot
from diffusionx.policy.service_model import (
    ReplicaLoad,
    StepTimeModel,
    choose_replica,
    expected_finish_s,
    predict_tier,
    rank_replicas,
)

T0, T1, B = 0.040, 0.010, 4  # seconds per batched step: t(b) = T0 + T1 * b


# -- a discrete-event simulation of `StepBatcher` inside the tier's model loop ----------------------------


@dataclass
class SimSample:
    index: int  # arrival order
    arrival_s: float
    steps: int
    remaining: int
    waited: int = 0
    predicted_s: float = 0.0

    @property
    def priority(self) -> tuple[int, int]:  # as StepBatcher: remaining - waited, then arrival
        return self.remaining - self.waited, self.index


def snapshot(pool: list[SimSample], queued: list[SimSample], step_time: tuple[float, float]) -> ReplicaLoad:
    ranked = sorted(pool, key=lambda s: s.priority)
    return ReplicaLoad(
        pool=tuple((s.priority[0], s.remaining) for s in ranked),
        queued=tuple(s.steps for s in queued),
        max_batch_size=B,
        step_time_s=step_time,
    )


def simulate(
    arrivals: list[tuple[float, int]],
    step_time: tuple[float, float] = (T0, T1),
    jitter: float = 0.0,
    know_step_in_flight: bool = False,
) -> list[SimSample]:
    """Runs the arrivals `(time_s, steps)` through the policy: samples join between steps (arrivals
    during a step wait for its end), each step takes the `B` lowest keys and lasts `t(b)` (times
    `1 + jitter * N(0, 1)`). At each arrival it records the model's prediction from what a replica would
    report then: the pool as of the last step boundary and the requests that arrived since, and (only
    with `know_step_in_flight`) what is left of the running step."""
    rng = np.random.default_rng(0)
    samples = [SimSample(i, t, k, k) for i, (t, k) in enumerate(sorted(arrivals))]
    pool: list[SimSample] = []
    queued: list[SimSample] = []
    finished: list[SimSample] = []
    clock, upcoming = 0.0, list(samples)

    def arrive(sample: SimSample, in_flight_s: float | None) -> None:
        load = snapshot(pool, queued, step_time)
        sample.predicted_s = expected_finish_s(load, sample.steps, in_flight_s)
        queued.append(sample)

    while upcoming or pool or queued:
        if not pool and not queued:
            clock = max(clock, upcoming[0].arrival_s)
        while upcoming and upcoming[0].arrival_s <= clock:  # at a step boundary: joins at once
            arrive(upcoming.pop(0), 0.0)
        pool += queued
        queued.clear()
        batch = sorted(pool, key=lambda s: s.priority)[:B]
        step_s = (T0 + T1 * len(batch)) * (1.0 + jitter * rng.standard_normal())
        end = clock + step_s
        while upcoming and upcoming[0].arrival_s < end:  # mid-step: the model assumes half a step left
            sample = upcoming.pop(0)
            arrive(sample, end - sample.arrival_s if know_step_in_flight else None)
        clock = end
        for sample in pool:
            if sample in batch:
                sample.remaining -= 1
            else:
                sample.waited += 1
        finished += [s for s in pool if s.remaining == 0]
        pool = [s for s in pool if s.remaining > 0]
        for sample in finished:
            if not hasattr(sample, "actual_s"):
                sample.actual_s = clock - sample.arrival_s  # type: ignore[attr-defined]
    return finished


def poisson_arrivals(utilization: float, n: int, seed: int) -> list[tuple[float, int]]:
    """`n` refinements, steps uniform in 5..40, at a Poisson rate that loads the tier to `utilization`
    of its full-batch throughput (B samples per t(B))."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(5, 41, size=n)
    rate = utilization * B / ((T0 + T1 * B) * steps.mean())  # requests per second
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    return [(float(t), int(k)) for t, k in zip(times, steps, strict=True)]


# -- exactness without later arrivals ---------------------------------------------------------------------


def test_a_burst_is_predicted_exactly():
    # nine requests at once: the last to arrive sees everything that will ever run with it
    done = simulate([(0.0, k) for k in (30, 12, 40, 7, 25, 25, 18, 33, 20)])
    last = max(done, key=lambda s: s.index)
    assert last.predicted_s == pytest.approx(last.actual_s, rel=1e-9)
    # the others could not see who came after them: later arrivals only ever delay a request
    assert all(s.predicted_s <= s.actual_s + 1e-12 for s in done)
    assert any(s.predicted_s < s.actual_s - 1e-3 for s in done)


def test_the_order_is_fixed_so_a_busy_pool_is_replayed_exactly():
    # requests arriving mid-step at a busy replica: the last one, after everyone else, is exact
    one_step = T0 + T1 * B
    arrivals = [(0.0, 40), (0.0, 40), (0.0, 40), (0.0, 40), (0.0, 40)]
    arrivals += [(i * one_step * 3.5, k) for i, k in enumerate((9, 3, 15, 6), start=1)]
    done = simulate(arrivals, know_step_in_flight=True)
    last = max(done, key=lambda s: s.arrival_s)
    assert last.predicted_s == pytest.approx(last.actual_s, rel=1e-9)


def test_batched_steps_not_summed_steps():
    # 4 samples of 10 steps fill one batch: a fifth waits about 10 batched steps, not 40 single ones
    load = ReplicaLoad(pool=((10, 10),) * 4, max_batch_size=4, step_time_s=(T0, T1))
    finish = expected_finish_s(load, 10, step_in_flight_s=0.0)
    assert finish == pytest.approx(10 * (T0 + 4 * T1) + 10 * (T0 + T1))
    # a shorter newcomer goes first (fewest remaining steps first), sharing the batch's slot
    short = expected_finish_s(load, 3, step_in_flight_s=0.0)
    assert short == pytest.approx(3 * (T0 + 4 * T1))


def test_an_aged_sample_keeps_its_place():
    # key 2 (40 remaining, waited 38): a new 5-step request does not pass it
    load = ReplicaLoad(pool=((2, 40),), max_batch_size=1, step_time_s=(0.0, 0.1))
    assert expected_finish_s(load, 5, 0.0) == pytest.approx((40 + 5) * 0.1)
    fresh = ReplicaLoad(pool=((40, 40),), max_batch_size=1, step_time_s=(0.0, 0.1))
    assert expected_finish_s(fresh, 5, 0.0) == pytest.approx(5 * 0.1)


# -- calibration under Poisson load -----------------------------------------------------------------------


@pytest.mark.parametrize("utilization", [0.3, 0.6, 0.9, 1.2])
def test_prediction_matches_the_simulated_batcher_across_loads(utilization):
    done = simulate(poisson_arrivals(utilization, 400, seed=1), jitter=0.05)
    ratios = np.array([s.predicted_s / s.actual_s for s in done])
    # later arrivals that pass a waiting request are the one thing the model cannot see
    assert 0.85 <= np.median(ratios) <= 1.15, np.median(ratios)
    assert np.mean((ratios >= 0.67) & (ratios <= 1.5)) >= 0.9, np.percentile(ratios, [5, 50, 95])


def test_the_old_unit_error_is_gone():
    # a burst of 9 x 40 steps at batch size 4: `queued_steps x seconds_per_step` said 360 steps,
    # the batcher takes about 360 / 4 batched steps; the model says what the simulation does
    burst = simulate([(0.0, 40)] * 9)
    load = ReplicaLoad(pool=((40, 40),) * 8, max_batch_size=4, step_time_s=(T0, T1))
    assert expected_finish_s(load, 40, 0.0) == pytest.approx(burst[-1].actual_s)
    naive_s = 9 * 40 * (T0 + T1 * B)
    assert naive_s / burst[-1].actual_s > 3.0


# -- step time ---------------------------------------------------------------------------------------------


def test_step_time_fit_recovers_t0_and_t1():
    model = StepTimeModel()
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = int(rng.integers(1, 9))
        model.observe(b, (0.05 + 0.02 * b) * (1 + 0.02 * rng.standard_normal()))
    t0, t1 = model.coefficients()
    assert t0 == pytest.approx(0.05, abs=0.005) and t1 == pytest.approx(0.02, abs=0.002)


def test_a_seed_gives_an_estimate_before_the_first_step():
    model = StepTimeModel()
    assert model.predict(1) is None and not model.measured
    model.seed([(1, 0.06), (4, 0.12)])
    assert model.predict(1) == pytest.approx(0.06) and model.predict(4) == pytest.approx(0.12)
    # one batch size observed many times: the fit follows it there and keeps the seed's slope elsewhere
    for _ in range(100):
        model.observe(2, 0.2)
    assert model.predict(2) == pytest.approx(0.2, rel=0.1)
    assert model.predict(4) > model.predict(2)


def test_without_a_seed_one_batch_size_gives_a_constant_step_time():
    model = StepTimeModel()
    model.observe(3, 0.3)
    model.observe(3, 0.5)
    assert model.coefficients()[1] == 0.0
    assert model.predict(1) == model.predict(8) == pytest.approx(0.4, rel=0.02)


def test_recent_observations_outweigh_old_ones():
    model = StepTimeModel()
    for _ in range(100):
        model.observe(1, 1.0)
    for _ in range(200):
        model.observe(1, 0.1)
    assert model.predict(1) == pytest.approx(0.1, rel=0.05)


# -- replicas and snapshots --------------------------------------------------------------------------------


def test_the_request_goes_where_it_is_expected_to_finish_first():
    # six 5-step samples on B=4 finish in 10 steps; one 30-step sample alone holds a slot for 30 but
    # the other three slots are free: a 10-step request finishes after 10 steps there, 15 on the busy one
    busy = ReplicaLoad(pool=((5, 5),) * 6, max_batch_size=4, step_time_s=(T0, T1))
    long_one = ReplicaLoad(pool=((30, 30),), max_batch_size=4, step_time_s=(T0, T1))
    assert choose_replica([busy, long_one], 10) == 1
    # fewest requests is not the criterion: four aged long samples (key 5, 40 steps left) fill every slot
    # ahead of the new one (50 steps), six short ones are done after 4 (12 steps)
    full = ReplicaLoad(pool=((5, 40),) * 4, max_batch_size=4, step_time_s=(T0, T1))
    many_short = ReplicaLoad(pool=((2, 2),) * 6, max_batch_size=4, step_time_s=(T0, T1))
    assert full.requests < many_short.requests and choose_replica([full, many_short], 10) == 1
    assert rank_replicas([full, many_short, long_one], 10) == [2, 1, 0]
    prediction = predict_tier([busy, long_one], 10)
    assert prediction.replica == 1 and prediction.finish_s == pytest.approx(expected_finish_s(long_one, 10))
    # a replica without a step time comes after every measured one
    unmeasured = ReplicaLoad()
    assert rank_replicas([unmeasured, full], 10) == [1, 0]
    with pytest.raises(ValueError, match="no cloud replica"):
        choose_replica([], 10)


def test_requests_sent_after_the_snapshot_queue_behind_it():
    load = ReplicaLoad(pool=((3, 3),), max_batch_size=1, step_time_s=(1.0, 0.0))
    later = load.with_queued([4, 2])
    assert later.queued == (4, 2) and later.requests == 3
    # B=1, in key order: the queued 2, the pooled 3, the queued 4, then the new 5: 14 steps
    assert expected_finish_s(later, 5, step_in_flight_s=0.0) == 14.0


def test_snapshot_spreads_unadmitted_steps_over_queued_requests():
    report = {
        "pool": [[3, 8], [10, 10]],
        "queued": 2,
        "queued_steps": 18 + 30,
        "max_batch_size": 4,
        "step_time_s": [0.01, 0.002],
    }
    load = ReplicaLoad.from_snapshot(TierSnapshot.from_dict(report))
    assert load.pool == ((3, 8), (10, 10)) and load.queued == (15, 15)
    assert load.max_batch_size == 4 and load.step_time_s == (0.01, 0.002)
    assert ReplicaLoad.from_snapshot(TierSnapshot(queued=0)).step_time_s is None


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="steps=-1"):
        expected_finish_s(ReplicaLoad(step_time_s=(T0, T1)), -1)
    with pytest.raises(ValueError, match="not measured"):
        expected_finish_s(ReplicaLoad(), 5)
    with pytest.raises(ValueError, match="max_batch_size=0"):
        ReplicaLoad(max_batch_size=0)
