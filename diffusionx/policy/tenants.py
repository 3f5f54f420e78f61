"""Tenants: API keys that carry a weight and a rate, and how a tier's capacity is shared among them.

A key is a plain string (weight 1, no rate) or an `ApiKey` with `weight`, `rate_per_s` and `burst`, in the
application's `api_keys` or, one a line, in the keys file (`key weight=2 rate_per_s=5 burst=10`).

Two decisions, both made at the door by admission control, without I/O:

1. **Rate.** A key over its own rate is refused at once with 429 and Retry-After = the time until its next
   request fits. The rate is a GCRA (a token bucket kept as one timestamp: `rate_per_s` sustained, `burst`
   requests at once) from `pyrate_limiter`, whose algorithm takes `now` as an argument, so the clock is
   injected and the policy is tested without sleeping; a refused request spends nothing.
2. **Share.** A tier's capacity (admission control's bound: the queued steps that fit in
   `admission_max_wait_s`, and the requests its bounded queue holds) is shared among the keys seen in the
   last `active_window_s`, in proportion to their weights, by weighted max-min fairness (water-filling):
   each key may hold up to its share, and room a key leaves unused goes to the others in proportion to
   their weights. A key seen recently keeps its whole share reserved even between its requests, so a
   key within its share is admitted even when the tier is full of another key's work: that other key,
   the one furthest over its share, is the one refused (503 + Retry-After) until its work has drained.
   With one key active this is exactly the single bound of admission control.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pyrate_limiter import GCRA, Rate

DEFAULT_ACTIVE_WINDOW_S = 30.0


class ApiKey(BaseModel):
    """An API key and the share of the service it is entitled to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1, description="The bearer token.")
    weight: float = Field(
        1.0, gt=0, le=1e6, description="Share of each tier's capacity, relative to the other keys' weights."
    )
    rate_per_s: float | None = Field(
        None, gt=0, le=1e6, description="Requests per second this key may send (sustained); unset: no limit."
    )
    burst: int | None = Field(
        None, ge=1, le=1_000_000, description="Requests at once above the rate; unset: one second's worth."
    )


def as_api_key(entry: str | ApiKey | Mapping) -> ApiKey:
    """An `api_keys` entry (a plain key, a mapping or an ApiKey) as an ApiKey."""
    if isinstance(entry, ApiKey):
        return entry
    if isinstance(entry, str):
        return ApiKey(key=entry.strip())
    return ApiKey(**entry)


def parse_key_line(line: str) -> ApiKey | None:
    """One line of the keys file: `key [weight=W] [rate_per_s=R] [burst=B]`, `#` starts a comment; None
    for a blank line. A field that is not one of these is a ValueError naming it."""
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    options: dict[str, str] = {}
    for field in fields[1:]:
        name, sep, value = field.partition("=")
        if not sep or name not in ("weight", "rate_per_s", "burst"):
            raise ValueError(f"keys file: {field!r} is not allowed; use weight=W, rate_per_s=R or burst=B")
        options[name] = value
    return ApiKey(key=fields[0], **options)


@dataclass(frozen=True)
class RateRefusal:
    """A request over its key's rate: 429 with Retry-After."""

    rate_per_s: float
    retry_after_s: int
    status: ClassVar[int] = 429

    @property
    def message(self) -> str:
        return (
            f"rate limited: this API key may send {self.rate_per_s:g} requests per second; "
            f"retry in {self.retry_after_s} s"
        )


class RateLimits:
    """Each key's GCRA state (one number per key with a rate) and the decision for its next request."""

    def __init__(self, rates: Mapping[str, tuple[float, int | None]], clock: Callable[[], float]) -> None:
        self.clock = clock
        self._algorithm = GCRA()
        self._rates: dict[str, tuple[float, list[Rate]]] = {}
        for owner, (rate_per_s, burst) in rates.items():
            burst = burst or max(1, math.ceil(rate_per_s))
            # `burst` requests refill in burst / rate_per_s seconds: one emission every 1 / rate_per_s
            interval_ms = max(1, round(burst * 1000.0 / rate_per_s))
            self._rates[owner] = (rate_per_s, [Rate(burst, interval_ms, burst)])
        self._state: dict[str, tuple] = {}

    def check(self, owner: str) -> RateRefusal | None:
        """None (and the request is counted) if `owner`'s next request fits its rate, else the refusal."""
        if owner not in self._rates:
            return None
        rate_per_s, rates = self._rates[owner]
        state = self._state.get(owner) or self._algorithm.initial(rates)
        now_ms = int(self.clock() * 1000)
        state, decision = self._algorithm.step(rates, state, now_ms, 1)
        self._state[owner] = state
        if decision.allowed:
            return None
        return RateRefusal(rate_per_s, max(1, math.ceil((decision.retry_after_ms or 1000) / 1000)))


def weighted_allocation(
    limit: float, demands: Mapping[str, float], weights: Mapping[str, float]
) -> dict[str, float]:
    """Weighted max-min fair shares of `limit` (water-filling): every owner gets min(demand, level x
    weight), with the level raised until `limit` is used up or every demand is met."""
    allocation = dict.fromkeys(demands, 0.0)
    left = max(0.0, limit)
    open_owners = sorted(demands, key=lambda o: demands[o] / weights[o])  # smallest demand per weight first
    while open_owners:
        total_weight = sum(weights[o] for o in open_owners)
        owner = open_owners[0]
        level = left / total_weight
        if demands[owner] <= level * weights[owner]:  # met in full: the rest share what remains
            allocation[owner] = demands[owner]
            left -= demands[owner]
            open_owners.pop(0)
            continue
        for other in open_owners:  # nobody left is met in full: each gets the level
            allocation[other] = level * weights[other]
        break
    return allocation


@dataclass(frozen=True)
class ShareDecision:
    """A share check of one bound: whether to admit, and the owner's allocation and usage there."""

    admit: bool
    used: float
    allocated: float
    share: float


class Tenants:
    """The keys' weights and rates, the keys seen lately, and the share decision."""

    def __init__(
        self,
        keys: Iterable[tuple[str, ApiKey]],
        active_window_s: float = DEFAULT_ACTIVE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`keys`: (owner id, ApiKey) pairs; owners not listed have weight 1 and no rate."""
        keys = list(keys)
        self.weights = {owner: key.weight for owner, key in keys}
        self.rates = RateLimits(
            {owner: (key.rate_per_s, key.burst) for owner, key in keys if key.rate_per_s}, clock
        )
        self.active_window_s = active_window_s
        self.clock = clock
        self._last_seen: dict[str, float] = {}

    def weight(self, owner: str) -> float:
        return self.weights.get(owner, 1.0)

    def seen(self, owner: str) -> None:
        """Marks `owner` active now (its share is then reserved for `active_window_s`)."""
        now = self.clock()
        self._last_seen[owner] = now
        for other, at in list(self._last_seen.items()):  # bounded by the keys configured
            if now - at > self.active_window_s:
                del self._last_seen[other]

    def active(self) -> list[str]:
        """Owners seen within the window."""
        now = self.clock()
        return [o for o, at in self._last_seen.items() if now - at <= self.active_window_s]

    def decide(self, owner: str, need: float, limit: float, used: Mapping[str, float]) -> ShareDecision:
        """Whether `owner` may add `need` to a bound of `limit` of which each active owner holds
        `used[owner]` (the unattributed rest already taken off `limit`). Every other active owner is
        counted at no less than its share (its share stays reserved); the requester is admitted while it
        holds less than its water-filled allocation."""
        active = set(self.active()) | {owner}
        weights = {o: self.weight(o) for o in active}
        total_weight = sum(weights.values())
        shares = {o: limit * weights[o] / total_weight for o in active}
        demands = {o: max(used.get(o, 0.0), shares[o]) for o in active if o != owner}
        demands[owner] = used.get(owner, 0.0) + need
        allocation = weighted_allocation(limit, demands, weights)
        held = used.get(owner, 0.0)
        return ShareDecision(held < allocation[owner], held, allocation[owner], shares[owner])
