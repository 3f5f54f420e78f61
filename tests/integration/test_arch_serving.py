"""The serving path at production size: serve_config_arch.yaml (SD v1.5 / Tiny-SD architectures, random
weights) on a local Ray cluster at 512x512. Previews, an edit, refinements (one alone, two of different
strengths sharing UNet steps), EC-Diff, and the replicas' memory at batch 1 and at the configured batch
size. Slow (several minutes on 2 cores): `pytest -m slow tests/integration/test_arch_serving.py -s` prints
the memory table that serve_config_arch.yaml's comments quote (and writes it as JSON to
$DIFFUSIONX_ARCH_MEMORY_JSON).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.own_ray_cluster, pytest.mark.timeout(2400)]

CONFIG = Path(__file__).resolve().parents[2] / "serve_config_arch.yaml"
SIZE = 512
PROMPT = "a photo of a cat in a garden"


@pytest.fixture(scope="module")
def arch_url():
    from deployments.local import start_local_app, stop_local_app
    from diffusionx.models.arch import arch_dir

    built_here = not arch_dir().exists()
    stop_local_app()  # one Ray per process: end the shared app (own_ray_cluster tests run last)
    try:
        yield start_local_app(CONFIG, port=8124, num_cpus=2, timeout_s=900)
    finally:
        stop_local_app()
        # 2.5 GB: keep it only where a person put it (DIFFUSIONX_HOME set), not in the per-run test home
        if built_here and arch_dir().is_relative_to(tempfile.gettempdir()):
            shutil.rmtree(arch_dir(), ignore_errors=True)


def size_of(body: dict) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(body["image"]))).size


def post_all(url: str, path: str, bodies: list[dict]) -> list[dict]:
    """Sends `bodies` at once (so that they can share a batch); every answer must be 200."""

    def post(body: dict) -> dict:
        response = httpx.post(f"{url}{path}", json=body, timeout=1800.0)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def recent_batch_sizes(url: str, tier: str) -> list[int]:
    return httpx.get(f"{url}/v1/stats", timeout=60.0).json()["tiers"][tier]["recent_batch_sizes"]


class Memory:
    """Peak RSS of a tier's replica per piece of work (see deployments.replica_memory)."""

    def __init__(self) -> None:
        from deployments.replica_memory import replica_pids

        self.pids = {"edge": replica_pids("EdgePreviewer"), "cloud": replica_pids("CloudRefiner")}
        assert all(len(p) == 1 for p in self.pids.values()), self.pids
        self.rows: dict[str, float] = {}

    def loaded(self) -> None:
        from deployments.replica_memory import memory_mib

        for tier, [pid] in self.pids.items():
            self.rows[f"{tier} after load"] = memory_mib(pid)["rss"]

    def measure(self, tier: str, label: str):
        from deployments.replica_memory import memory_mib, reset_peak

        [pid] = self.pids[tier]
        reset_peak(pid)
        rows = self.rows

        class _Peak:
            def __enter__(self) -> None:
                return None

            def __exit__(self, *exc_info: object) -> None:
                rows[f"{tier} {label}"] = memory_mib(pid)["peak"]

        return _Peak()


def test_serving_path_at_512(arch_url):
    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    batch_edge, batch_cloud = args["edge_max_batch_size"], args["cloud_max_batch_size"]
    assert batch_edge == batch_cloud == 2  # the bodies below fill exactly one batch
    health = httpx.get(f"{arch_url}/v1/health", timeout=60.0).json()
    assert health["edge"]["model"] == "tiny-sd-arch" and health["cloud"]["model"] == "sd15-arch"
    memory = Memory()
    memory.loaded()
    sized = {"width": SIZE, "height": SIZE}

    # 1. a preview alone (batch 1), then a full batch of previews
    with memory.measure("edge", "preview batch 1"):
        [first] = post_all(
            arch_url, "/v1/preview", [{"prompt": PROMPT, "seed": 1, "num_inference_steps": 1, **sized}]
        )
    assert size_of(first) == (SIZE, SIZE) and first["unet_calls"] == {
        "cloud": 0,
        "edge": 1,
        "approximated": 0,
    }
    bodies = [{"prompt": PROMPT, "seed": s, "num_inference_steps": 1, **sized} for s in range(batch_edge)]
    with memory.measure("edge", f"preview batch {batch_edge}"):
        previews = post_all(arch_url, "/v1/preview", bodies)
    assert [p["timings_ms"]["batch_size"] for p in previews] == [batch_edge] * batch_edge
    assert all(size_of(p) == (SIZE, SIZE) for p in previews)

    # 2. a round-to-round edit of a preview, by id (img2img on the edge: 4 edit steps x 0.5)
    [edited] = post_all(
        arch_url,
        "/v1/preview",
        [{"prompt": "a photo of a dog", "seed": 1, "preview_id": first["preview_id"], "strength": 0.5}],
    )
    assert size_of(edited) == (SIZE, SIZE) and edited["unet_calls"]["edge"] == 2

    # 3. a refinement alone, then two of different strengths that share UNet steps (step-level batching)
    refine = {"prompt": PROMPT, "seed": 1, "preview_id": first["preview_id"], "num_inference_steps": 2}
    with memory.measure("cloud", "refine batch 1"):
        [alone] = post_all(arch_url, "/v1/refine", [{**refine, "strength": 0.5}])
    assert alone["route"] == "cloud" and alone["unet_calls"]["cloud"] == 1 and size_of(alone) == (SIZE, SIZE)
    mixed = [{**refine, "num_inference_steps": 4, "strength": s} for s in (0.5, 0.25)]
    with memory.measure("cloud", f"refine batch {batch_cloud}"):
        refined = post_all(arch_url, "/v1/refine", mixed)
    assert [r["unet_calls"]["cloud"] for r in refined] == [2, 1]
    assert batch_cloud in recent_batch_sizes(arch_url, "cloud")  # one UNet call carried both strengths

    # 4. EC-Diff: cloud steps 0-1, step 2 extrapolated, edge step 3, edge VAE decodes
    [ec] = post_all(
        arch_url,
        "/v1/generate",
        [
            {
                "prompt": PROMPT,
                "seed": 3,
                "mode": "ec-diff",
                "num_inference_steps": 4,
                "warmup_steps": 2,
                "approx_interval": 1,
                "smoothing": 0.3,
                "switch_step": 3,
                **sized,
            }
        ],
    )
    assert ec["unet_calls"] == {"cloud": 2, "edge": 1, "approximated": 1} and size_of(ec) == (SIZE, SIZE)

    print("\nreplica memory (RSS MiB, fp32, 512x512):")
    for label, mib in memory.rows.items():
        print(f"  {label:<24} {mib:8.0f}")
    if os.environ.get("DIFFUSIONX_ARCH_MEMORY_JSON"):
        Path(os.environ["DIFFUSIONX_ARCH_MEMORY_JSON"]).write_text(json.dumps(memory.rows, indent=2) + "\n")
