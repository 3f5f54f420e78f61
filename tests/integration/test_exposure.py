"""What a local application listens on (docs/exposure.md): everything the application controls on
loopback; beyond loopback only HAProxy's stats page and metrics exporter, which Ray Serve's HAProxy
template binds on every interface."""

from __future__ import annotations

import os
from ipaddress import ip_address

import psutil
import pytest

from tests.integration.conftest import TEST_METRICS_PORT

pytestmark = pytest.mark.ray


def test_only_haproxys_two_ports_listen_beyond_loopback(serve_url):
    ours = {process.pid for process in psutil.Process().children(recursive=True)}  # this session's Ray
    listening = [
        c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours
    ]
    exposed = {c.laddr.port for c in listening if not ip_address(c.laddr.ip).is_loopback}
    haproxy = {int(os.environ[f"RAY_SERVE_HAPROXY_{name}_PORT"]) for name in ("STATS", "METRICS")}
    assert exposed <= haproxy, f"listening beyond loopback: {sorted(exposed - haproxy)}"
    loopback = {c.laddr.port for c in listening if ip_address(c.laddr.ip).is_loopback}
    assert {TEST_METRICS_PORT, int(serve_url.rsplit(":", 1)[1])} <= loopback
