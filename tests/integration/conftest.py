"""The live application: one local Ray Serve cluster for the whole session, shared by every integration test
file (started on first use)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

TEST_CONFIG = Path(__file__).with_name("serve_config_test.yaml")
TEST_METRICS_PORT = 9465  # not diffusionx serve's 9464, so that tests run beside a served app


@pytest.fixture(scope="session")
def serve_url():
    from deployments.local import start_local_app, stop_local_app

    try:
        yield start_local_app(
            TEST_CONFIG,
            port=8123,
            num_cpus=2,
            timeout_s=240,
            metrics_port=TEST_METRICS_PORT,
            metrics_report_interval_ms=1000,
        )
    finally:
        stop_local_app()


@pytest.fixture
def http(serve_url):
    with httpx.Client(base_url=serve_url, timeout=120.0) as client:
        yield client
