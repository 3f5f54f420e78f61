"""Shared fixtures. Tests run offline on the CPU; generated artefacts go to a per-run temp directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSIONX_HOME", tempfile.mkdtemp(prefix="diffusionx-test-home-"))

import httpx
import pytest
import torch

from diffusionx.models.loading import LoadedModel, load_model

# Two cores shared by the test process and the Ray workers: one torch thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cloud() -> LoadedModel:
    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def tiny_edge() -> LoadedModel:
    return load_model("tiny-random-edge", device="cpu")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that start a Ray cluster of their own run last: one process holds one Ray, so they end the shared
    application (`serve_url`), and no test that needs it may come after them."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray_cluster") is not None)  # stable sort


# -- the live application: one local Ray Serve cluster for the whole session, shared by every test file ----
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
