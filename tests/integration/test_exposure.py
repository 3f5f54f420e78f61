"""What a local application listens on (docs/exposure.md): the ports the application controls, its HTTP
port and Ray's metrics exporter, listen on loopback only."""

from __future__ import annotations

from ipaddress import ip_address

import psutil
import pytest

from tests.integration.conftest import TEST_METRICS_PORT

pytestmark = pytest.mark.ray


def test_the_http_port_and_the_metrics_exporter_listen_on_loopback_only(serve_url):
    ours = {process.pid for process in psutil.Process().children(recursive=True)}  # this session's Ray
    listening = [
        c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours
    ]
    controlled = {TEST_METRICS_PORT, int(serve_url.rsplit(":", 1)[1])}
    where = {(c.laddr.ip, c.laddr.port) for c in listening if c.laddr.port in controlled}
    assert {port for _, port in where} == controlled, where  # both listen ...
    assert all(ip_address(ip).is_loopback for ip, _ in where), where  # ... on loopback only
