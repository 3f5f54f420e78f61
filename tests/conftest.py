"""Shared fixtures. Tests run offline on the CPU; generated artefacts go to a per-run temp directory."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSIONX_HOME", tempfile.mkdtemp(prefix="diffusionx-test-home-"))

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
