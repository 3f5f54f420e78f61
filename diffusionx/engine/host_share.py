"""How a CPU replica runs speculative (background) steps without taking the host from others.

On a GPU a background step uses the device's idle time. On a CPU replica the "device" is the host's cores,
which the edge replica, the predictor and the ingress may share (the embedded application runs every tier
on one machine): a background step that runs while they compute slows their requests as much as a
foreground step would. So on CPU a step of background work alone runs only while the host has a core that
no other process is using (`HostIdle`: the host's busy CPU time from `/proc/stat`, less this process's
own, over the last `window_s`); a request of another tier that arrives meanwhile shares the cores with at
most the one background step in flight.

The step keeps the replica's torch threads: fewer threads would change the floating-point order of the
UNet's reductions, and a speculation must give the pixels of the same refinement run in the foreground.
It runs at the lowest CPU priority instead (`LowPriority`), so a request of another tier that arrives
during it gets the cores first. `/proc/stat` is Linux's; elsewhere `HostIdle` always answers idle.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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
    """Whether the host has a core free of other processes now: over the last `window_s` (at least), the
    cores other processes used (host busy time less this process's) are at most `cores - free_cores`.
    Callers ask often; it re-measures once a window has passed and answers the last decision meanwhile.
    The clocks are injected for tests."""

    def __init__(
        self,
        window_s: float = 0.05,
        free_cores: float = 1.0,
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


def _threads() -> list[int]:
    """This process's thread ids (Linux: /proc/self/task); empty elsewhere."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return []


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _set_nice(tid: int, value: int) -> None:
    os.setpriority(os.PRIO_PROCESS, tid, value)


class LowPriority:
    """Runs a block (a step of speculative work alone) with this process's threads at the lowest CPU
    priority (`nice` 19), then puts them back. `HostIdle` lets the step start while a core is free, but a
    preview that arrives during it would share the cores with it as an equal; at nice 19 the host's
    scheduler gives that preview's threads the cores first (weight 15 against 1024), which is what "idle
    capacity only" means on shared cores. Priorities do not change what the step computes, so a
    speculation's pixels stay those of the same refinement run in the foreground.

    Putting a thread back from nice 19 is raising its priority, which Linux allows only with
    CAP_SYS_NICE or a high enough RLIMIT_NICE: `available` says whether this process may (probed once on
    a thread of its own); where it may not, the block runs at its normal priority. The thread functions are
    injected for tests."""

    def __init__(
        self,
        nice: int = 19,
        threads: Callable[[], list[int]] = _threads,
        get_nice: Callable[[int], int] = _nice,
        set_nice: Callable[[int, int], None] = _set_nice,
        available: bool | None = None,
    ) -> None:
        self.nice = nice
        self._threads, self._get, self._set = threads, get_nice, set_nice
        self.available = self._probe() if available is None else available

    def _probe(self) -> bool:
        if not hasattr(os, "setpriority") or not self._threads():
            return False
        allowed: list[bool] = []

        def attempt() -> None:  # on a thread that ends here, so a failed restore leaves nothing behind
            tid = threading.get_native_id()
            before = self._get(tid)
            try:
                self._set(tid, min(19, before + 1))
                self._set(tid, before)
                allowed.append(True)
            except OSError:
                allowed.append(False)

        probe = threading.Thread(target=attempt, name="nice-probe")
        probe.start()
        probe.join()
        return bool(allowed and allowed[0])

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.available:
            yield
            return
        changed: dict[int, int] = {}
        for tid in self._threads():
            try:
                before = self._get(tid)
                if before < self.nice:
                    self._set(tid, self.nice)
                    changed[tid] = before
            except OSError:  # a thread that ended meanwhile
                continue
        try:
            yield
        finally:
            for tid, before in changed.items():
                with suppress(OSError):
                    self._set(tid, before)
