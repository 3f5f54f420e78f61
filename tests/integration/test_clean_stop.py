"""`diffusionx serve` stops cleanly on SIGTERM: Ray is shut down and none of its processes remain.

The server runs in a subprocess with its own Ray temp dir (RAY_TMPDIR), so its processes (raylet, GCS,
dashboard agent, runtime-env agent, workers) are told apart from any other Ray instance on the machine by
that directory in their command lines; HAProxy (Serve's HTTP ingress) is given its config file there too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.ray

CONFIG = Path(__file__).with_name("serve_config_test.yaml")


def ray_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in process.info["cmdline"] or ()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_ray_on_a_signal_and_leaves_no_process(sig):
    import ray

    assert not ray.is_initialized(), "run before the session's application (one Ray instance at a time)"
    temp_dir = tempfile.mkdtemp(prefix="dx-stop-", dir="/tmp")  # short: Ray's socket paths must fit
    env = {
        **os.environ,
        "RAY_TMPDIR": temp_dir,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{temp_dir}/haproxy/haproxy.cfg",  # in haproxy's command line
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "diffusionx.cli",
        "serve",
        "--config",
        str(CONFIG),
        "--port",
        "8125",
        "--metrics-port",
        "9466",
    ]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        lines = []
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            lines.append(line)
            if "serving on" in line or server.poll() is not None:
                break
        assert any("serving on" in line for line in lines), "".join(lines[-30:])
        started = ray_processes(temp_dir)
        names = [p.name() for p in started]
        assert any("raylet" in " ".join(p.cmdline()) for p in started), names
        assert "haproxy" in names, names  # the HTTP port is HAProxy's (deployments.local.SERVE_FAST_PATH_ENV)
        server.send_signal(sig)
        assert server.wait(timeout=90) == 0
        deadline = time.monotonic() + 20  # children that exit on their parent's death need a moment
        while ray_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [" ".join(p.cmdline())[:120] for p in ray_processes(temp_dir)]
        assert not left, left
    finally:
        if server.poll() is None:
            server.kill()
        for process in ray_processes(temp_dir):  # only this test's processes: they carry its temp dir
            process.kill()
