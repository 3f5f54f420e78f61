"""Admission control: refuse work at the door, at once, when it could not start within a bound.

The ingress knows each tier's queue from two sources: the tier's `TierLoad` that the replicas report to the
shared state (`queued_steps` of all replicas, `replicas`, the step time; refreshed in the background, a
view older than `view_max_age_s` is not trusted), and the work this ingress itself admitted and has not seen
finish (it counts up at once, while reports lag a burst). The work ahead of a new request is the larger of
the two, and under a queue it drains one full batch of `B = max_batch_size` request-steps per batched step:

    wait_s = max(reported_queued_steps, own_queued_steps) * t(B) / (replicas * B)

`t(B)` is the replicas' fitted time of a batched step at batch B (`TierLoad.step_s`, seeded by each
replica's start-up warm-up). The fit matters: a step at batch 8 takes
several times one at batch 1, and a view measured on lone requests would admit that many times too much
work, which then bounced late off the tier's own bounded queue instead of being refused here.

A request that needs a tier whose wait exceeds `max_wait_s` is refused with Retry-After = the time until
that wait is back under the bound (at least 1 s). So is one that would not fit the tier's bounded queue:
Serve refuses a caller's request when the tier's replicas hold `max_ongoing_requests` each and the caller's
own queue `max_queued_requests` more (`request_capacity` in the view); this ingress refuses it first, at
the door, when its own requests at the tier reach that capacity, with Retry-After = the time to drain the
excess. Before a tier has measured its step time the time bound is not applied. Deciding takes no I/O, so
a refusal costs microseconds, not a place in a queue.

With tenants (`diffusionx.policy.tenants`: API keys with weights and rates) a key over its rate is refused
first (429), and while more than one key is active both bounds are shared among the keys by weight: the
work this ingress admitted is counted per key, and the key over its share is the one refused.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from diffusionx.policy.load import TierLoad
from diffusionx.policy.tenants import RateRefusal, Tenants

BACKGROUND_CALLS = 4  # background calls one ingress has at a tier at once (`background_room`)
REFUSAL_MARK = "before new work starts"  # in every refusal's message (clients.shed_bench counts them by it)


@dataclass(frozen=True)
class Refusal:
    tier: str
    wait_s: float
    retry_after_s: int
    status: ClassVar[int] = 503

    @property
    def message(self) -> str:
        return (
            f"overloaded: the {self.tier} tier's queue needs ~{self.wait_s:.1f} s {REFUSAL_MARK}; "
            f"retry in {self.retry_after_s} s"
        )


@dataclass(frozen=True)
class ShareRefusal(Refusal):
    """The tier is full and this API key holds more than its weighted share of it."""

    bound: str = "steps"  # "steps" (the time bound) or "requests" (the queue bound)
    used: float = 0.0
    allocated: float = 0.0

    @property
    def message(self) -> str:
        return (
            f"overloaded: this API key holds {self.used:.0f} {self.bound} of the {self.tier} tier, over "
            f"its share ({self.allocated:.0f} now); the queue needs ~{self.wait_s:.1f} s {REFUSAL_MARK}; "
            f"retry in {self.retry_after_s} s"
        )


class AdmissionControl:
    def __init__(
        self,
        max_batch_sizes: Mapping[str, int],
        max_wait_s: float = 5.0,
        view_max_age_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        tenants: Tenants | None = None,
    ) -> None:
        if max_wait_s <= 0:
            raise ValueError(f"max_wait_s={max_wait_s} must be > 0")
        self.max_batch_sizes = dict(max_batch_sizes)
        self.max_wait_s = max_wait_s
        self.view_max_age_s = view_max_age_s
        self.clock = clock
        self._view: dict[str, TierLoad] = {}
        self._view_at = -math.inf
        self.own_steps = dict.fromkeys(self.max_batch_sizes, 0)  # one counter per tier: never grows
        self.own_requests = dict.fromkeys(self.max_batch_sizes, 0)
        self.background_requests = dict.fromkeys(self.max_batch_sizes, 0)  # `holding`'s calls
        self.tenants = tenants
        # per tier: each API key's admitted request-steps and requests (keys with work in flight only)
        self.owner_steps: dict[str, Counter[str]] = {tier: Counter() for tier in self.max_batch_sizes}
        self.owner_requests: dict[str, Counter[str]] = {tier: Counter() for tier in self.max_batch_sizes}
        self.admitted = 0
        self.refused = 0

    def update(self, tiers: Mapping[str, TierLoad]) -> None:
        """A fresh view of every tier's load."""
        self._view = dict(tiers)
        self._view_at = self.clock()

    def _tier_view(self, tier: str) -> TierLoad:
        """The reported load of `tier`, or an empty one when it is older than `view_max_age_s` (not
        trusted)."""
        fresh = self.clock() - self._view_at <= self.view_max_age_s
        return self._view.get(tier, TierLoad()) if fresh else TierLoad()

    def _step_s(self, tier: str) -> float | None:
        """Seconds per queued request-step on `tier` (t(B) / (replicas * B)); None before it is measured."""
        view = self._tier_view(tier)
        batch = self.max_batch_sizes.get(tier, 1)
        seconds_per_step = view.step_s(batch)
        if not seconds_per_step or seconds_per_step <= 0:
            return None
        return seconds_per_step / (max(1, view.replicas) * batch)

    def _queued_steps(self, tier: str) -> int:
        return max(self._tier_view(tier).queued_steps, self.own_steps.get(tier, 0))

    def wait_s(self, tier: str) -> float:
        """Expected seconds before new work on `tier` starts."""
        step_s = self._step_s(tier)
        return 0.0 if step_s is None else self._queued_steps(tier) * step_s

    def capacity(self, tier: str) -> int | None:
        """Requests this ingress may have at `tier` before Serve would refuse the next (None: unbounded)."""
        return self._tier_view(tier).request_capacity

    def _requests(self, tier: str) -> int:
        """This ingress's requests at `tier`: the admitted ones and the background calls (`holding`); Serve
        bounds them together (one queue per caller and tier)."""
        return self.own_requests.get(tier, 0) + self.background_requests.get(tier, 0)

    def background_room(self, tier: str) -> bool:
        """Whether a background call to `tier` (speculation's, edit preparation's) may start now. Serve
        queues this ingress's calls to a tier in one bounded queue, and while the tier has no replica free
        to take a call (one died and its replacement is starting, or foreground work fills them) a
        background call would wait there in a place a user's request needs: under an outage, the previews
        answered meanwhile would fill the queue with their speculations and push finalizes out as 503s. So
        one starts only while this ingress's requests at the tier leave one of the replicas' request slots
        free, and at most `BACKGROUND_CALLS` run at once (they are short: submit, peek, drop, prepare)."""
        background = self.background_requests.get(tier, 0)
        if background >= BACKGROUND_CALLS:
            return False
        slots = self._tier_view(tier).replica_slots
        return slots is None or self.own_requests.get(tier, 0) + background < slots

    def decide(self, needs: Mapping[str, int], owner: str = "") -> Refusal | RateRefusal | None:
        """None to admit a request of API key `owner` that needs `needs` (tier -> its request-steps), else
        why not."""
        if self.tenants is not None:
            self.tenants.seen(owner)
            refusal: Refusal | RateRefusal | None = self.tenants.rates.check(owner)
            shared = refusal is None and len(self.tenants.active()) > 1
            if shared:  # several keys active: the bounds are shared among them
                refusal = self._decide_shared(needs, owner)
            if refusal is not None:
                self.refused += 1
            if refusal is not None or shared:
                return refusal
        for tier in needs:
            wait_s = self.wait_s(tier)
            if wait_s > self.max_wait_s:
                self.refused += 1
                return Refusal(tier, wait_s, max(1, math.ceil(wait_s - self.max_wait_s)))
            capacity = self.capacity(tier)
            requests = self._requests(tier)
            if capacity is not None and requests >= capacity:
                # the queue is full: a slot frees when the excess over capacity has drained
                drain_s = wait_s * (requests - capacity + 1) / requests
                self.refused += 1
                return Refusal(tier, wait_s, max(1, math.ceil(drain_s)))
        return None

    def _decide_shared(self, needs: Mapping[str, int], owner: str) -> ShareRefusal | None:
        """Both bounds of each tier shared among the active API keys by weight (`Tenants.decide`)."""
        assert self.tenants is not None
        for tier, steps in needs.items():
            wait_s, step_s = self.wait_s(tier), self._step_s(tier)
            owned = self.owner_steps.setdefault(tier, Counter())
            if step_s is not None:
                limit = self.max_wait_s / step_s  # request-steps that start within max_wait_s
                decision = self.tenants.decide(owner, steps, limit, owned)
                if not decision.admit:  # until its excess over its allocation has drained
                    excess_s = (decision.used + steps - decision.allocated) * step_s
                    retry = max(1, math.ceil(excess_s))
                    return ShareRefusal(tier, wait_s, retry, "steps", decision.used, decision.allocated)
                # Shares are of this ingress's own admitted work (the tiers' reports lag it, and would
                # count work that just finished against everyone). A key within its share is admitted on
                # that alone; a key borrowing beyond it also needs the tier as a whole to have room.
                if decision.used + steps > decision.share and wait_s > self.max_wait_s:
                    retry = max(1, math.ceil(wait_s - self.max_wait_s))
                    return ShareRefusal(tier, wait_s, retry, "steps", decision.used, decision.share)
            capacity = self.capacity(tier)
            if capacity is not None:
                requests = self.owner_requests.setdefault(tier, Counter())
                decision = self.tenants.decide(owner, 1, capacity, requests)
                if not decision.admit:
                    excess = decision.used + 1 - decision.allocated
                    drain_s = wait_s * excess / max(1, self.own_requests.get(tier, 0))
                    retry = max(1, math.ceil(drain_s))
                    return ShareRefusal(tier, wait_s, retry, "requests", decision.used, decision.allocated)
        return None

    @contextmanager
    def holding(self, tier: str) -> Iterator[None]:
        """Counts a call this ingress makes to `tier` outside any admitted request (speculation's calls to
        the cloud replicas: submit, peek, claim, drop; edit preparation's to the edge) as one of its
        requests there while it runs: it takes one of the request slots Serve bounds (`capacity`), and a
        burst admitted without it would find one slot fewer and bounce off Serve's queue instead of being
        refused here. Background calls that may wait ask `background_room` first."""
        self.background_requests[tier] = self.background_requests.get(tier, 0) + 1
        try:
            yield
        finally:
            self.background_requests[tier] -= 1

    @contextmanager
    def admit(self, needs: Mapping[str, int], owner: str = "") -> Iterator[None]:
        """Counts `needs` (and one request per tier) as this ingress's queued work, and as `owner`'s, while
        the block runs."""
        self.admitted += 1
        for tier, steps in needs.items():
            self.own_steps[tier] = self.own_steps.get(tier, 0) + steps
            self.own_requests[tier] = self.own_requests.get(tier, 0) + 1
            self.owner_steps.setdefault(tier, Counter())[owner] += steps
            self.owner_requests.setdefault(tier, Counter())[owner] += 1
        try:
            yield
        finally:
            for tier, steps in needs.items():
                self.own_steps[tier] -= steps
                self.own_requests[tier] -= 1
                for counts, amount in ((self.owner_steps[tier], steps), (self.owner_requests[tier], 1)):
                    counts[owner] -= amount
                    if counts[owner] <= 0:  # only keys with work in flight stay
                        del counts[owner]
