"""What a local application listens on (docs/exposure.md): its HTTP API on loopback only."""

from __future__ import annotations

from ipaddress import ip_address

import psutil
import pytest

pytestmark = pytest.mark.ray


def test_the_http_api_listens_on_loopback_only(serve_url):
    ours = {process.pid for process in psutil.Process().children(recursive=True)}  # this session's Ray
    port = int(serve_url.rsplit(":", 1)[1])
    where = {
        c.laddr.ip
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in ours and c.laddr.port == port
    }
    assert where and all(ip_address(ip).is_loopback for ip in where), where
