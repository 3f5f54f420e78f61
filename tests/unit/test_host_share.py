"""`HostIdle`: whether a CPU replica's background step may run, from the host's busy time less its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusionx.engine.host_share import HostIdle, host_busy_s


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
