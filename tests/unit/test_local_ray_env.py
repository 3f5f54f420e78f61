"""The environment a new local Ray inherits: HAProxy ports free now, chosen again for every Ray."""

from __future__ import annotations

import os

from deployments import local

STATS, METRICS = "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"


def test_haproxy_ports_are_chosen_again_for_every_ray_but_a_users_own_are_kept(monkeypatch):
    environ = {k: v for k, v in os.environ.items() if k not in (STATS, METRICS)}
    monkeypatch.setattr(local.os, "environ", environ)  # a copy: nothing leaks into this process's
    monkeypatch.setattr(local, "_chosen_haproxy_ports", {})
    ports = iter(range(41000, 41100))
    monkeypatch.setattr(
        local, "haproxy_ports_env", lambda: {STATS: str(next(ports)), METRICS: str(next(ports))}
    )
    local.set_local_ray_env()
    first = (environ[STATS], environ[METRICS])
    local.set_local_ray_env()  # a later Ray: the earlier ports may be taken by now
    assert (environ[STATS], environ[METRICS]) != first
    environ[STATS] = "9999"  # the user's own
    local.set_local_ray_env()
    assert environ[STATS] == "9999" and environ[METRICS] not in first
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # the fast path goes with them


def test_haproxy_ports_are_two_free_ports_outside_the_ranges_ray_and_the_kernel_hand_out():
    import socket

    low, high = local.HAPROXY_PORT_RANGE
    assert 19999 < low < high <= 30000  # above Ray's worker ports, below Serve's replica ports
    chosen = local.haproxy_ports_env()
    stats, metrics = int(chosen[STATS]), int(chosen[METRICS])
    assert stats != metrics and all(low <= port < high for port in (stats, metrics))
    with socket.socket() as held:  # a port something listens on is never chosen
        held.bind(("0.0.0.0", stats))
        held.listen()
        for _ in range(20):
            assert str(stats) not in local.haproxy_ports_env().values()
