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

The gate decides before a step; the kernel decides during it. A request that arrives while a background
step runs would otherwise share the cores with it until the gate's next look (a window and a step later).
So the thread that runs background work alone runs it in Linux's idle scheduling class (`SCHED_IDLE`,
`IdleThreadPriority`): the kernel gives it only CPU time no other thread of the host wants, at once. When
foreground work arrives at the replica itself, the loop puts that thread back in the normal class, so the
foreground waits for the step in flight at normal priority, never for a starved one. Only the calling
thread changes class: with `torch_threads: 1` (the CPU configs) that is the whole step; with more, torch's
worker threads keep the normal class. Where the scheduler refuses (no `SCHED_IDLE`, or a process not
allowed to return to the normal class), background work runs at normal priority, as before.

The step keeps the replica's torch threads: fewer threads would change the floating-point order of the
UNet's reductions, and a speculation must give the pixels of the same refinement run in the foreground.
`/proc/stat` is Linux's; elsewhere `HostIdle` always answers idle.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
T = TypeVar("T")
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


def _set_idle_class(thread_id: int) -> None:
    os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]


def _set_normal_class(thread_id: int) -> None:
    os.sched_setscheduler(thread_id, os.SCHED_OTHER, os.sched_param(0))  # type: ignore[attr-defined]


def idle_class_works() -> bool:
    """Whether a thread of this process may enter `SCHED_IDLE` and return to the normal class (tried on a
    short-lived thread: Linux lets an unprivileged thread return only within its RLIMIT_NICE)."""
    works: list[bool] = []

    def probe() -> None:
        try:
            _set_idle_class(0)
            _set_normal_class(0)
            works.append(True)
        except (AttributeError, OSError):
            works.append(False)

    thread = threading.Thread(target=probe, name="sched-idle-probe")
    thread.start()
    thread.join()
    return bool(works and works[0])


class IdleThreadPriority:
    """Runs a blocking call with its thread in the idle scheduling class, until `restore` (module
    docstring). `run` is called in the worker thread; `allow` and `restore` on the event loop, before the
    call is dispatched and when foreground work arrives. Thread-safe. The class switches are injected for
    tests; by default they are the kernel's, probed once (`enabled` False where they do not work)."""

    def __init__(
        self,
        set_idle: Callable[[int], None] = _set_idle_class,
        set_normal: Callable[[int], None] = _set_normal_class,
        thread_id: Callable[[], int] = threading.get_native_id,
        enabled: bool | None = None,
    ) -> None:
        self.enabled = idle_class_works() if enabled is None else enabled
        if not self.enabled:
            logger.info("SCHED_IDLE is not available here: background steps run at normal priority")
        self._set_idle, self._set_normal, self._thread_id = set_idle, set_normal, thread_id
        self._lock = threading.Lock()
        self._allowed = False  # whether the call about to run (or running) may stay at idle
        self._idle_thread: int | None = None  # the thread at idle now
        self.idle_calls = 0  # calls that ran (at least partly) at idle
        self.restores = 0  # times foreground took a thread back from idle mid-call

    def allow(self) -> None:
        """The next call dispatched runs at idle (unless `restore` comes first)."""
        with self._lock:
            self._allowed = True

    def restore(self) -> None:
        """Foreground work arrived: the call at idle (if any) goes on at normal priority, and one not yet
        started does not enter idle."""
        with self._lock:
            self._allowed = False
            if self._idle_thread is not None:
                self._back_to_normal(self._idle_thread)
                self.restores += 1

    def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in this thread, at idle if allowed and still allowed when it starts."""
        with self._lock:
            idle = self.enabled and self._allowed
            if idle:
                me = self._thread_id()
                try:
                    self._set_idle(me)
                    self._idle_thread = me
                    self.idle_calls += 1
                except OSError as error:  # e.g. a seccomp profile that forbids it: run as before
                    logger.warning("could not enter SCHED_IDLE (%r); background steps run normally", error)
                    self.enabled = idle = False
        try:
            return function(*args)
        finally:
            if idle:
                with self._lock:
                    self._allowed = False
                    if self._idle_thread is not None:
                        self._back_to_normal(self._idle_thread)

    def _back_to_normal(self, thread_id: int) -> None:
        try:
            self._set_normal(thread_id)
        except OSError as error:  # probed at start; if it fails now, say so: the thread stays idle
            logger.warning("could not return thread %d from SCHED_IDLE: %r", thread_id, error)
        self._idle_thread = None
