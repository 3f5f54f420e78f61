"""Arrival processes and think times of `diffusionx loadgen`: when requests (or sessions) start.

All times are seconds from the start of the run. Every process stops at `duration_s` and after
`max_arrivals`, and is deterministic in its `random.Random`.

- `poisson_arrivals`: a homogeneous Poisson process of `rate` per second (exponential gaps).
- `ramp_arrivals`: a Poisson process whose rate goes linearly from `start_rate` to `end_rate` over the
  duration (Lewis-Shedler thinning of a process at the larger rate).
- `trace_arrivals`: a published serving trace, one request per line with its arrival time in milliseconds
  as the first field, separated from any further fields by a comma or whitespace (a header line and blank
  lines are skipped; DiffServe's `trace_1to8qps.txt`, `arrival_ms,prompt_index`, reads as it is published).
  Lines need not be in time order: the arrivals are sorted and the lines earlier than a line above them
  counted (`Trace.out_of_order`). Times are taken relative to the earliest request and multiplied by
  `time_scale` (2.0 stretches the trace to half the rate).
- `think_time_s`: the pause of a person between two rounds of a session: log-normal with the given mean
  and a log-space sigma of `THINK_SIGMA` (median = mean x exp(-sigma^2 / 2), about 0.84 x mean; a long
  right tail of slow rounds), the usual model of human think times.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

THINK_SIGMA = 0.6


def _check(duration_s: float, max_arrivals: int) -> None:
    if not duration_s > 0:
        raise ValueError(f"duration_s={duration_s} must be > 0")
    if max_arrivals < 1:
        raise ValueError(f"max_arrivals={max_arrivals} must be >= 1")


def poisson_arrivals(rate: float, duration_s: float, max_arrivals: int, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process of `rate` per second in [0, duration_s)."""
    _check(duration_s, max_arrivals)
    if not rate > 0:
        raise ValueError(f"rate={rate} must be > 0 (requests per second)")
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s and len(times) < max_arrivals:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def ramp_arrivals(
    start_rate: float, end_rate: float, duration_s: float, max_arrivals: int, rng: random.Random
) -> list[float]:
    """Poisson arrivals whose rate rises (or falls) linearly from `start_rate` to `end_rate`."""
    _check(duration_s, max_arrivals)
    if start_rate < 0 or end_rate < 0 or max(start_rate, end_rate) <= 0:
        raise ValueError(f"ramp {start_rate}:{end_rate}: rates must be >= 0 and not both 0")
    peak = max(start_rate, end_rate)
    times: list[float] = []
    for t in poisson_arrivals(peak, duration_s, 10**9, rng):
        rate = start_rate + (end_rate - start_rate) * t / duration_s
        if rng.random() * peak < rate:  # keep with probability rate(t) / peak
            times.append(t)
            if len(times) >= max_arrivals:
                break
    return times


@dataclass(frozen=True)
class Trace:
    """Arrivals read from a trace file: `arrivals` (s, sorted, from the earliest line, scaled, cut to the
    duration and count), the arrival lines read, and how many came earlier than a line above them."""

    arrivals: list[float]
    lines: int
    out_of_order: int


_FIELD_SEPARATOR = re.compile(r"[,\s]+")


def trace_arrivals(path: str | Path, time_scale: float, duration_s: float, max_arrivals: int) -> Trace:
    """Arrivals (s) from a trace file whose lines start with an arrival time in milliseconds."""
    _check(duration_s, max_arrivals)
    if not time_scale > 0:
        raise ValueError(f"time_scale={time_scale} must be > 0")
    stamps: list[float] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        field = _FIELD_SEPARATOR.split(line.strip(), maxsplit=1)[0]
        if not field:
            continue
        try:
            stamps.append(float(field))
        except ValueError:
            if number == 1 and not stamps:  # a header
                continue
            raise ValueError(
                f"{path}:{number}: the first field (comma- or space-separated) must be an arrival time in "
                f"milliseconds, got {field!r}"
            ) from None
    if not stamps:
        raise ValueError(f"{path}: no arrival times (one request per line, time in ms first)")
    out_of_order, latest = 0, -math.inf
    for ms in stamps:
        out_of_order += ms < latest
        latest = max(latest, ms)
    stamps.sort()
    times = [(ms - stamps[0]) / 1000.0 * time_scale for ms in stamps]
    return Trace([t for t in times if t < duration_s][:max_arrivals], len(stamps), out_of_order)


def think_time_s(mean_s: float, rng: random.Random) -> float:
    """One think time: log-normal with mean `mean_s` (0 gives 0) and log-space sigma THINK_SIGMA."""
    if mean_s < 0:
        raise ValueError(f"think time mean {mean_s} must be >= 0")
    if mean_s == 0:
        return 0.0
    return rng.lognormvariate(math.log(mean_s) - THINK_SIGMA**2 / 2, THINK_SIGMA)
