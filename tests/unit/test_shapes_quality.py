"""End-to-end quality of the shipped shapes weights, measured by the judge: a broken model, VAE, text
encoder, tokenizer or sampler fails these."""

from __future__ import annotations

import pytest

from diffusionx.models.loading import load_model
from diffusionx.models.registry import EMBEDDED_SHAPES_DIR
from diffusionx.requests import PreviewRequest
from diffusionx.sampling.generation import preview, text_to_image
from diffusionx.shapes.data import heldout_prompts
from diffusionx.shapes.judge import mean_scores
from diffusionx.workflows.local import generate_all, local_tiers
from diffusionx.workflows.modes import GenerateRequest

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_SHAPES_DIR / "unet_edge").exists(), reason="embedded shapes weights not built"
)

N = 32


@pytest.fixture(scope="module")
def shapes_pair():
    cloud = load_model("shapes-cloud", device="cpu")
    edge = load_model("shapes-edge", device="cpu")
    assert edge.vae is cloud.vae and edge.text_encoder is cloud.text_encoder
    return cloud, edge


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return heldout_prompts(N, seed=1)


def accuracy(images, prompts) -> float:
    return mean_scores(images, prompts)["accuracy"]


def exact(images, prompts) -> float:
    """Share of images with every attribute right: the gap between the tiers shows here, not in the mean."""
    return mean_scores(images, prompts)["exact"]


def test_cloud_model_draws_what_the_caption_says(shapes_pair, prompts):
    cloud, _ = shapes_pair
    results = text_to_image(cloud, [PreviewRequest(p, seed=i) for i, p in enumerate(prompts)], tier="cloud")
    assert accuracy([r.image for r in results], prompts) >= 0.75
    # and not just any picture: the same images against shuffled captions score far lower
    shifted = prompts[1:] + prompts[:1]
    assert accuracy([r.image for r in results], shifted) < 0.6


def test_edge_preview_is_worse_and_refining_it_closes_the_gap(shapes_pair, prompts):
    cloud, edge = shapes_pair
    requests = [PreviewRequest(p, seed=i) for i, p in enumerate(prompts)]
    edge_quality = exact([r.image for r in preview(edge, requests)], prompts)
    cloud_quality = exact([r.image for r in text_to_image(cloud, requests, tier="cloud")], prompts)
    finals = [GenerateRequest(p, seed=i, strength=0.8) for i, p in enumerate(prompts)]
    refined = generate_all(local_tiers(cloud, edge), "diffusionx", finals)
    refined_quality = exact([g.result.image for g in refined], prompts)
    assert edge_quality < cloud_quality - 0.1
    assert refined_quality > edge_quality + 0.1
