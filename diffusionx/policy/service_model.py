"""Service model of the cloud tier: when would a new refinement of `k` steps finish on a replica?

A cloud replica runs refinements through `step_batching.StepBatcher`: one UNet call per step for up to
`B` samples, samples join between steps and leave when their schedule is done. Which samples advance is
decided by a key, `remaining steps - steps waited` (lower first; ties to the earlier arrival). Every step
lowers every pooled sample's key by exactly one: a sample in the batch loses a remaining step, a sample
left out gains a waited step. So the order of the samples in the pool never changes after they join; it
is a fixed priority order (earliest deadline first, the deadline being "the step I would finish at had I
run every step"). A new request joins with key `k` behind every sample whose key is `<= k`.

That makes the prediction exact for a replica with no further arrivals, and cheap (`expected_finish_s`):
walk the samples in priority order, the batch is the first `B` still alive, it runs until its shortest
member finishes (`m` steps of `t(b)` seconds each, `b` the batch size), the finished ones leave, repeat
until the new sample has finished. Requests queued in front of the engine (Serve's batch queue, not yet
admitted) join at the next step with key = their steps, in arrival order, before the new one.

Step time. `StepTimeModel` fits `t(b) = t0 + t1 * b`, the time of one batched step (UNet call, DDIM update,
and the decode of samples that finish in it) as a function of the batch size, by least squares over
exponentially forgotten observations once they spread over batch sizes. Before that it scales a seed line
(a start-up warm-up at two batch sizes) to what was observed, so the first request has an estimate and a
replica that only ever runs one batch size keeps a sensible slope; without a seed, `t(b)` is then that
size's mean time.

Arrivals after the prediction. Requests that join later make every later step of a batch that is not full
slower (`t(b)` grows with `b`) and, when shorter, pass the new one. Given `Arrivals` (a rate and the steps
of each, as the router measured them recently) the replay adds them as they come, step by step, each
joining by its key. Without it the replay assumes no further arrival.

What it leaves out (it is a model): how arrivals really fall (the replay spreads them evenly), whole
batches of other kinds (cloud-only text-to-image, EC-Diff plans) that the model loop interleaves with
engine steps, and samples of another image size or guidance scale (which cannot share a batch; the tier
serves one size in practice). The router adds a fixed overhead (encode, batch wait, transport) on top and
multiplies by a factor learned from measured latencies (`calibration.LatencyCalibration`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from diffusionx.policy.load import TierSnapshot

FORGET = 0.97  # weight kept per observation: about the last 1 / (1 - 0.97) = 33 steps count
MIN_SPREAD = 0.5  # weighted std of observed batch sizes above which the slope is fitted from them
MIN_STEP_S = 1e-4  # floor of t(b): a fit never predicts a free or negative step


@dataclass
class StepTimeModel:
    """`t(b) = t0 + t1 * b` seconds per batched step, fitted online (see the module docstring)."""

    forget: float = FORGET
    # weighted sums over observations (b, t): sum w, sum w b, sum w b^2, sum w t, sum w b t
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5)
    _seed: list[float] = field(default_factory=lambda: [0.0] * 5)
    observations: int = 0

    def seed(self, points: Sequence[tuple[int, float]]) -> None:
        """Seeds the fit with measured `(batch_size, seconds per step)` points (e.g. a warm-up at 1 and B)."""
        self._seed = [0.0] * 5
        for batch_size, seconds in points:
            self._add(self._seed, 1.0, batch_size, seconds)

    def observe(self, batch_size: int, seconds: float) -> None:
        """One measured step of `batch_size` samples that took `seconds`."""
        if batch_size < 1 or not math.isfinite(seconds) or seconds <= 0:
            return
        self._sums = [value * self.forget for value in self._sums]
        self._add(self._sums, 1.0, batch_size, seconds)
        self.observations += 1

    @staticmethod
    def _add(sums: list[float], weight: float, b: float, t: float) -> None:
        for i, value in enumerate((1.0, b, b * b, t, b * t)):
            sums[i] += weight * value

    @property
    def measured(self) -> bool:
        return self._seed[0] > 0 or self._sums[0] > 0

    def coefficients(self) -> tuple[float, float] | None:
        """(t0, t1) in seconds, or None before any seed or observation.

        Observations that spread over batch sizes (weighted std of b >= MIN_SPREAD) are fitted by least
        squares. Otherwise the slope is not identified: the seed's line is scaled to the observations'
        weighted mean (or, without a seed, t(b) is that mean); with no observation, the seed itself.
        """
        seed = self._line(self._seed)
        if seed is None and self._seed[0] > 0:  # a seed at one batch size: a constant step time
            seed = self._seed[3] / self._seed[0], 0.0
        w, sb, sbb, st, _ = self._sums
        if w <= 0:
            return seed
        spread = math.sqrt(max(0.0, sbb / w - (sb / w) ** 2))
        if spread >= MIN_SPREAD:
            return self._line(self._sums)
        if seed is None:
            return st / w, 0.0
        seeded_mean = seed[0] * w + seed[1] * sb  # sum of w * seed(b)
        scale = st / seeded_mean if seeded_mean > 0 else 1.0
        return seed[0] * scale, seed[1] * scale

    @staticmethod
    def _line(sums: list[float]) -> tuple[float, float] | None:
        """Weighted least-squares (t0, t1) of the sums; None when empty or when b does not vary."""
        w, sb, sbb, st, sbt = sums
        variance = w * sbb - sb * sb
        if w <= 0 or variance <= 1e-12 * max(1.0, w * sbb):
            return None
        t1 = (w * sbt - sb * st) / variance
        return (st - t1 * sb) / w, t1

    def predict(self, batch_size: int) -> float | None:
        coefficients = self.coefficients()
        if coefficients is None:
            return None
        t0, t1 = coefficients
        return max(MIN_STEP_S, t0 + t1 * batch_size)

    def to_pair(self) -> list[float] | None:
        coefficients = self.coefficients()
        return None if coefficients is None else [coefficients[0], coefficients[1]]


@dataclass(frozen=True)
class Arrivals:
    """Refinements expected to join a replica after a prediction: `per_s` a second, `steps` steps each."""

    per_s: float = 0.0
    steps: int = 0

    def per_replica(self, replicas: int) -> Arrivals:
        return Arrivals(self.per_s / max(1, replicas), self.steps)


@dataclass(frozen=True)
class ReplicaLoad:
    """What one cloud replica reports: its pool, its queue, its batch capacity and step time.

    `pool` holds `(key, remaining_steps)` of the samples in the step batcher (waiting and running) in
    priority order; `queued` the steps of each request queued in front of it, oldest first;
    `step_time_s` is `(t0, t1)` of `StepTimeModel`, None when not measured yet.
    """

    pool: tuple[tuple[int, int], ...] = ()
    queued: tuple[int, ...] = ()
    max_batch_size: int = 1
    step_time_s: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1")

    @property
    def requests(self) -> int:
        return len(self.pool) + len(self.queued)

    @property
    def remaining_steps(self) -> int:
        return sum(remaining for _, remaining in self.pool) + sum(self.queued)

    def step_s(self, batch_size: int) -> float:
        if self.step_time_s is None:
            raise ValueError("step time not measured: step_time_s is None")
        t0, t1 = self.step_time_s
        return max(MIN_STEP_S, t0 + t1 * batch_size)

    def with_queued(self, steps: Sequence[int]) -> ReplicaLoad:
        """This load plus requests of `steps` steps queued behind it (sent after the snapshot was taken)."""
        return replace(self, queued=(*self.queued, *steps))

    @classmethod
    def from_snapshot(cls, snapshot: TierSnapshot) -> ReplicaLoad:
        """From a replica's `TierSnapshot`. Requests still queued are only counted there, with their steps
        summed: each gets the mean of what the pool does not account for."""
        pool = tuple((int(key), int(remaining)) for key, remaining in snapshot.pool)
        queued = max(0, snapshot.queued)
        unaccounted = snapshot.queued_steps - sum(r for _, r in pool)
        each = max(1, round(unaccounted / queued)) if queued else 0
        step_time = snapshot.step_time_s
        return cls(
            pool=pool,
            queued=(each,) * queued,
            max_batch_size=max(1, snapshot.max_batch_size),
            step_time_s=None if step_time is None else (float(step_time[0]), float(step_time[1])),
        )


def expected_finish_s(
    replica: ReplicaLoad,
    steps: int,
    step_in_flight_s: float | None = None,
    arrivals: Arrivals | None = None,
) -> float:
    """Seconds until a refinement of `steps` denoising steps that joins `replica` now would finish.

    Replays the step batcher's fixed-priority schedule (module docstring). `step_in_flight_s` is what is
    left of the step running now; by default, with a busy pool, half a step (a request arrives at a
    uniformly random point of it). With `arrivals`, later requests join as they are expected to
    (`_replay_with_arrivals`). Raises ValueError when the step time is not measured.
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    if steps == 0:
        return 0.0
    if arrivals is not None and arrivals.per_s > 0 and arrivals.steps > 0:
        return _replay_with_arrivals(replica, steps, step_in_flight_s, arrivals)
    # 1. everyone in priority order: the pool as it is, then the queued ones and the new one by key
    #    (stable sort: at equal keys the earlier arrival goes first, the new request last)
    joining = [(s, s, False) for s in replica.queued] + [(steps, steps, True)]
    order = [(key, remaining, False) for key, remaining in replica.pool] + joining
    order.sort(key=lambda entry: entry[0])
    alive = [[remaining, is_new] for _, remaining, is_new in order]
    capacity = replica.max_batch_size
    # 2. the step running now (if any) finishes first; then batches of the first `capacity` alive
    elapsed = _in_flight_s(replica, step_in_flight_s)
    while True:
        batch = alive[:capacity]
        run = min(remaining for remaining, _ in batch)
        elapsed += run * replica.step_s(len(batch))
        for entry in batch:
            entry[0] -= run
        if any(is_new and remaining == 0 for remaining, is_new in batch):
            return elapsed
        alive = [entry for entry in alive if entry[0] > 0]


def _in_flight_s(replica: ReplicaLoad, step_in_flight_s: float | None) -> float:
    if step_in_flight_s is not None:
        return step_in_flight_s
    busy = min(replica.max_batch_size, len(replica.pool))
    return 0.5 * replica.step_s(busy) if busy else 0.0


def _replay_with_arrivals(
    replica: ReplicaLoad, steps: int, step_in_flight_s: float | None, arrivals: Arrivals
) -> float:
    """`expected_finish_s` with `arrivals.per_s` requests of `arrivals.steps` steps joining, evenly
    spread, one step at a time. Every step lowers every key by one, so a sample's key at step j is its
    "deadline" (key at joining + steps run before it joined) minus j: ordering by deadline is ordering by
    key. A request joining at step j has deadline `arrivals.steps + j` and goes behind every sample whose
    deadline is not larger (ties to the earlier arrival). The new request keeps its deadline `steps`, and
    later arrivals' deadlines grow with j, so it always finishes."""
    entries = [(float(key), remaining, False) for key, remaining in replica.pool]
    entries += [(float(s), s, False) for s in replica.queued]
    entries.append((float(steps), steps, True))
    entries.sort(key=lambda entry: entry[0])  # stable: ties keep arrival order, the new one last
    alive = [[deadline, remaining, is_new] for deadline, remaining, is_new in entries]
    capacity = replica.max_batch_size
    elapsed = _in_flight_s(replica, step_in_flight_s)
    joined = 0
    for step in range(1_000_000):  # bounded: the new request's deadline is fixed, arrivals' grow
        for _ in range(int(arrivals.per_s * elapsed) - joined):  # arrivals due by now join the order
            deadline = float(arrivals.steps + step)
            position = next((i for i, entry in enumerate(alive) if entry[0] > deadline), len(alive))
            alive.insert(position, [deadline, arrivals.steps, False])
            joined += 1
        batch = alive[:capacity]
        elapsed += replica.step_s(len(batch))
        for entry in batch:
            entry[1] -= 1
        if any(is_new and remaining == 0 for _, remaining, is_new in batch):
            return elapsed
        alive = [entry for entry in alive if entry[1] > 0]
    raise AssertionError("unreachable: the new request finishes within its deadline's steps")


@dataclass(frozen=True)
class TierPrediction:
    """The replica a refinement is expected to run on and when it would finish there."""

    replica: int  # index into the tier's replicas
    finish_s: float


def rank_replicas(replicas: Sequence[ReplicaLoad], steps: int) -> list[int]:
    """Replica indices, the one where a new refinement of `steps` steps would finish first, first.

    This is the cloud deployment's replica choice (its Ray Serve request router ranks replicas by it), so
    the replica the router's prediction assumes is the one the request is sent to. Replicas with a
    measured step time are ranked by `expected_finish_s` (ties: fewer requests, then the lower index);
    replicas not measured yet follow, by fewest requests.
    """
    if not replicas:
        raise ValueError("no cloud replica reported its load")

    def key(i: int) -> tuple[int, float, int, int]:
        replica = replicas[i]
        if replica.step_time_s is None:
            return 1, 0.0, replica.requests, i
        return 0, expected_finish_s(replica, max(1, steps)), replica.requests, i

    return sorted(range(len(replicas)), key=key)


def choose_replica(replicas: Sequence[ReplicaLoad], steps: int) -> int:
    """The replica a new refinement of `steps` steps goes to: where it is expected to finish first."""
    return rank_replicas(replicas, steps)[0]


def predict_tier(
    replicas: Sequence[ReplicaLoad], steps: int, arrivals: Arrivals | None = None
) -> TierPrediction:
    """When a refinement of `steps` would finish on the tier, on the replica `choose_replica` picks; with
    `arrivals` (the tier's), each replica gets its share of them."""
    index = choose_replica(replicas, steps)
    share = None if arrivals is None else arrivals.per_replica(len(replicas))
    return TierPrediction(index, expected_finish_s(replicas[index], steps, arrivals=share))
