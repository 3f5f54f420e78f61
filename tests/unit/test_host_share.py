"""`HostIdle`: whether a CPU replica's background step may run, from the host's busy time less its own;
`IdleThreadPriority`: a background step at the kernel's idle priority, taken back when foreground arrives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffusionx.engine.host_share import HostIdle, IdleThreadPriority, host_busy_s, idle_class_works


class Counters:
    def __init__(self) -> None:
        self.now = 0.0
        self.busy = 0.0  # host CPU seconds, all processes
        self.own = 0.0  # this process's CPU seconds

    def run(self, seconds: float, others_cores: float, own_cores: float = 0.0) -> None:
        self.now += seconds
        self.busy += seconds * (others_cores + own_cores)
        self.own += seconds * own_cores


def idle_check(counters: Counters, cores: int = 2) -> HostIdle:
    return HostIdle(
        window_s=0.05,
        cores=cores,
        busy_s=lambda: counters.busy,
        own_s=lambda: counters.own,
        clock=lambda: counters.now,
    )


def test_idle_while_a_core_and_a_half_are_free_of_other_processes_and_this_replica_does_not_count():
    counters = Counters()
    idle = idle_check(counters)
    assert idle()  # nothing measured yet: idle
    counters.run(0.1, others_cores=0.2, own_cores=2.0)  # this replica busy on both cores: still idle
    assert idle() and idle.others_cores == pytest.approx(0.2)
    counters.run(0.1, others_cores=1.6)  # the edge replica computes on both cores
    assert not idle()
    counters.run(0.01, others_cores=0.0)  # within the window the last answer stands
    assert not idle()
    counters.run(0.1, others_cores=1.0)  # the edge computes on one core: the other is left to the
    assert not idle()  # proxy, the ingress and the predictor of the request it serves
    counters.run(0.1, others_cores=0.4)  # an idle Ray host's own processes: about 0.2
    assert idle()  # 2 - 0.4 cores left >= 1.5: a core for the step and half a core for the others


def test_without_proc_stat_the_host_always_counts_as_idle(tmp_path: Path):
    assert host_busy_s(tmp_path / "missing") is None
    assert HostIdle(busy_s=lambda: None)()
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 20 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    busy = host_busy_s(stat)
    assert busy is not None and busy > 0
    with pytest.raises(ValueError, match="must be > 0"):
        HostIdle(window_s=0)


class ClassSwitches:
    """Fake kernel scheduling-class switches: records (class, thread) and can refuse."""

    def __init__(self, refuse_idle: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.refuse_idle = refuse_idle

    def idle(self, thread_id: int) -> None:
        if self.refuse_idle:
            raise PermissionError("not permitted")
        self.calls.append(("idle", thread_id))

    def normal(self, thread_id: int) -> None:
        self.calls.append(("normal", thread_id))


def idle_priority(switches: ClassSwitches, enabled: bool = True) -> IdleThreadPriority:
    return IdleThreadPriority(switches.idle, switches.normal, thread_id=lambda: 42, enabled=enabled)


def test_an_allowed_call_runs_at_idle_and_returns_to_normal():
    switches = ClassSwitches()
    priority = idle_priority(switches)
    assert priority.run(lambda x: x + 1, 1) == 2 and switches.calls == []  # not allowed: as it was
    priority.allow()
    assert priority.run(lambda: "done") == "done"
    assert switches.calls == [("idle", 42), ("normal", 42)] and priority.idle_calls == 1
    switches.calls.clear()
    assert priority.run(lambda: None) is None and switches.calls == []  # one allow, one call


def test_foreground_takes_the_thread_back_mid_call_and_before_a_call_starts():
    switches = ClassSwitches()
    priority = idle_priority(switches)
    priority.allow()

    def step() -> str:
        assert switches.calls == [("idle", 42)]
        priority.restore()  # foreground arrives while the step runs (from the event loop's thread)
        assert switches.calls == [("idle", 42), ("normal", 42)]
        return "stepped"

    assert priority.run(step) == "stepped"
    assert switches.calls == [("idle", 42), ("normal", 42)] and priority.restores == 1  # once only
    switches.calls.clear()
    priority.allow()
    priority.restore()  # arrived between dispatch and start: the call never enters idle
    assert priority.run(lambda: 1) == 1 and switches.calls == [] and priority.restores == 1


def test_a_refused_or_unavailable_idle_class_runs_calls_as_before():
    refused = ClassSwitches(refuse_idle=True)
    priority = idle_priority(refused)
    priority.allow()
    assert priority.run(lambda: "ran") == "ran" and not priority.enabled and refused.calls == []
    off = ClassSwitches()
    priority = idle_priority(off, enabled=False)
    priority.allow()
    assert priority.run(lambda: "ran") == "ran" and off.calls == []


@pytest.mark.skipif(
    not idle_class_works(), reason="this process may not leave SCHED_IDLE (not root, RLIMIT_NICE)"
)
def test_the_kernel_runs_an_allowed_call_in_sched_idle():
    priority = IdleThreadPriority()
    priority.allow()
    assert priority.run(os.sched_getscheduler, 0) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
