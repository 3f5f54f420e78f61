"""How a CPU replica runs speculative (background) steps without taking the host from others.

On a GPU a background step uses the device's idle time. On a CPU replica the "device" is the host's cores,
which the edge replica, the predictor and the ingress may share (the embedded application runs every tier
on one machine): a background step that runs while they compute slows their requests as much as a
foreground step would. So on CPU a step of background work alone runs only while the host has a core that
no other process is using, and half a core besides (`HostIdle`: the host's busy CPU time from
`/proc/stat`, less this process's own, over the last `window_s`, leaves `free_cores` = 1.5); a request of
another tier that arrives meanwhile shares the cores with at most the one background step in flight. The
half core is for what a request needs beside its model: the proxy, the ingress and the predictor. With a
core alone, on a 2-core host a speculative step runs beside every preview the edge computes on the other
core, and the preview's other processes wait for both; an idle Ray host's own processes use well under
half a core, so the step still runs whenever no request is being computed.

The step keeps the replica's torch threads: fewer threads would change the floating-point order of the
UNet's reductions, and a speculation must give the pixels of the same refinement run in the foreground.
`/proc/stat` is Linux's; elsewhere `HostIdle` always answers idle.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# /proc/stat's first line: cpu user nice system idle iowait irq softirq steal ...; busy = all but idle, iowait
_IDLE_FIELDS = (3, 4)


def host_busy_s(stat: Path = PROC_STAT) -> float | None:
    """Seconds of CPU time the host's processes have used since boot (all cores), or None without
    `/proc/stat`."""
    try:
        line = stat.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = [int(value) for value in line.split()[1:9]]
    busy = sum(value for index, value in enumerate(fields) if index not in _IDLE_FIELDS)
    return busy / os.sysconf("SC_CLK_TCK")


class HostIdle:
    """Whether the host has `free_cores` free of other processes now: over the last `window_s` (at least), the
    cores other processes used (host busy time less this process's) are at most `cores - free_cores`.
    Callers ask often; it re-measures once a window has passed and answers the last decision meanwhile.
    The clocks are injected for tests."""

    def __init__(
        self,
        window_s: float = 0.05,
        free_cores: float = 1.5,  # a core for the step, half a core for other requests' light work
        cores: int | None = None,
        busy_s: Callable[[], float | None] = host_busy_s,
        own_s: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0 or free_cores <= 0:
            raise ValueError("window_s and free_cores must be > 0")
        self.window_s = window_s
        self.free_cores = free_cores
        self.cores = cores or os.cpu_count() or 1
        self._busy_s, self._own_s, self._clock = busy_s, own_s, clock
        self._last: tuple[float, float, float] | None = None  # (clock, host busy, own)
        self.idle = True
        self.others_cores = 0.0

    def __call__(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.window_s:
            return self.idle  # within the window: no file read (the model loop asks every few ms)
        busy = self._busy_s()
        if busy is None:
            return True
        own = self._own_s()
        if self._last is None:
            self._last = (now, busy, own)
            return self.idle
        then, busy_then, own_then = self._last
        self.others_cores = max(0.0, (busy - busy_then) - (own - own_then)) / (now - then)
        self.idle = self.cores - self.others_cores >= self.free_cores
        self._last = (now, busy, own)
        return self.idle
