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

Once a background step runs, the gate cannot take its core back for the step's duration: a preview that
arrives meanwhile would share the cores with it as with a foreground step. So a step of background work
alone runs on its own worker thread at the lowest CPU priority (`LowPriorityThread`, nice 19 for that
thread and the torch threads it starts): the kernel's scheduler then gives any other runnable thread of
the host (the edge, the proxy, the ingress, this replica's own event loop) the core first, and the step
takes only what they leave. A foreground step, or one that mixes foreground and background samples,
stays on the normal-priority threads.

The step keeps the replica's torch threads: fewer threads would change the floating-point order of the
UNet's reductions, and a speculation must give the pixels of the same refinement run in the foreground.
`/proc/stat` and per-thread niceness are Linux's; elsewhere `HostIdle` always answers idle and
`LowPriorityThread` runs at the process's priority.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

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


LOWEST_PRIORITY = 19  # the largest niceness Linux allows


def _lower_thread_priority(niceness: int) -> None:
    """Raises the calling thread's niceness to `niceness` (Linux: per thread; raising it needs no privilege,
    and the threads it starts later, torch's OpenMP team among them, inherit it)."""
    if not sys.platform.startswith("linux"):
        return  # PRIO_PROCESS would name the whole process elsewhere
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(niceness, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError as error:
        logger.warning("background steps keep the normal CPU priority: %s", error)


class LowPriorityThread:
    """A `ModelLoop` runner (`await runner(function, *args)`) on one worker thread of the lowest CPU
    priority, for steps of background work alone (see the module docstring). One thread: a replica runs
    one step at a time anyway, and the thread's torch threads are started once, at its priority."""

    def __init__(self, niceness: int = LOWEST_PRIORITY) -> None:
        self.niceness = niceness
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="background-step",
            initializer=_lower_thread_priority,
            initargs=(niceness,),
        )

    async def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))
