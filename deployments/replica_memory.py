"""Resident memory of the replicas of a running application, from the kernel's own counters.

`/proc/PID/status` gives the resident set now (VmRSS) and its peak (VmHWM); writing "5" to
`/proc/PID/clear_refs` resets the peak to the current size (Linux >= 4.0), so the peak of one piece of
work is read exactly, without sampling. Replica processes are found in Ray's actor table. Linux only.
"""

from __future__ import annotations

from pathlib import Path

MIB = 1024 * 1024


def replica_pids(deployment: str, app: str = "diffusionx") -> list[int]:
    """PIDs of the live replicas of `deployment` (actor class `ServeReplica:<app>:<deployment>`).

    Read from the GCS actor table: the public `ray.util.state.list_actors` needs the dashboard, which the
    local starter leaves off.
    """
    from ray._private.state import actors

    return sorted(
        int(info["Pid"])
        for info in actors().values()
        if info["State"] == "ALIVE" and info["ActorClassName"] == f"ServeReplica:{app}:{deployment}"
    )


def memory_mib(pid: int) -> dict[str, float]:
    """{"rss": resident MiB now, "peak": resident MiB at the peak since start or the last reset}."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024 / MIB  # reported in kB
    return {"rss": round(fields["VmRSS"], 1), "peak": round(fields["VmHWM"], 1)}


def reset_peak(pid: int) -> None:
    """Sets the process's peak resident size (VmHWM) back to its current size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
