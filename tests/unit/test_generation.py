from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusionx.requests import Img2ImgRequest, InvalidRequestError, PreviewRequest
from diffusionx.sampling.generation import edit, preview, refine, text_to_image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_preview_shape_and_cost(tiny_edge):
    [result] = preview(tiny_edge, [PreviewRequest("a red circle", seed=3, width=32, height=48)])
    assert result.image.size == (32, 48)
    assert result.unet_calls.to_dict() == {
        "cloud": 0,
        "edge": tiny_edge.spec.preview_steps,
        "approximated": 0,
    }
    assert {"unet", "vae", "model_total"} <= set(result.timings_ms)


def test_same_seed_same_image_alone_or_in_any_batch(tiny_edge):
    target = PreviewRequest("a blue square", seed=42, num_inference_steps=3)
    [alone] = preview(tiny_edge, [target])
    batch = preview(
        tiny_edge,
        [PreviewRequest("a cat", seed=1, num_inference_steps=3), target, PreviewRequest("a dog", seed=9)],
    )
    assert batch[1].batch_size == 2  # grouped with the other 3-step request, not the default-step one
    assert np.array_equal(pixels(alone.image), pixels(batch[1].image))
    [other_seed] = preview(tiny_edge, [PreviewRequest("a blue square", seed=43, num_inference_steps=3)])
    assert not np.array_equal(pixels(alone.image), pixels(other_seed.image))


@pytest.mark.parametrize(
    ("strength", "steps", "expected"), [(0.5, 20, 10), (1.0, 20, 20), (0.25, 8, 2), (0.0, 20, 0)]
)
def test_refine_strength_to_unet_calls(tiny_cloud, strength, steps, expected):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    [result] = refine(
        tiny_cloud, [Img2ImgRequest("a cat", image, strength, seed=0, num_inference_steps=steps)]
    )
    assert result.unet_calls.to_dict() == {"cloud": expected, "edge": 0, "approximated": 0}
    assert result.image.size == (32, 32)
    if expected == 0:
        assert np.array_equal(pixels(result.image), pixels(image))


def test_refine_counts_actual_unet_evaluations(tiny_cloud, monkeypatch):
    calls = []
    original = tiny_cloud.unet.forward
    monkeypatch.setattr(tiny_cloud.unet, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    refine(tiny_cloud, [Img2ImgRequest("a cat", image, 0.5, num_inference_steps=20)])
    assert len(calls) == 10


def test_mixed_strength_batch_matches_requests_run_alone(tiny_cloud):
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    requests = [Img2ImgRequest("a dog", image, s, seed=5, num_inference_steps=10) for s in (0.3, 0.8, 0.3)]
    together = refine(tiny_cloud, requests)
    assert [r.unet_calls.cloud for r in together] == [3, 8, 3]
    for request, result in zip(requests, together, strict=True):
        [alone] = refine(tiny_cloud, [request])
        assert np.array_equal(pixels(alone.image), pixels(result.image))


def test_edit_counts_on_edge_and_changes_the_image(tiny_edge):
    [base] = preview(tiny_edge, [PreviewRequest("a cat", seed=1)])
    [edited] = edit(tiny_edge, [Img2ImgRequest("a dog", base.image, 0.5, seed=1, num_inference_steps=4)])
    assert edited.unet_calls.to_dict() == {"cloud": 0, "edge": 2, "approximated": 0}
    assert not np.array_equal(pixels(base.image), pixels(edited.image))


def test_text_to_image_on_cloud_counts_cloud_calls(tiny_cloud):
    [result] = text_to_image(tiny_cloud, [PreviewRequest("a house", num_inference_steps=3)], tier="cloud")
    assert result.unet_calls.cloud == 3 and result.unet_calls.edge == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": "x" * 1001}, "at most 1000"),
        ({"prompt": "a", "width": 30}, "width=30 is not allowed: use a multiple of 8"),
        ({"prompt": "a", "height": 4096}, "between 8 and 1024"),
        ({"prompt": "a", "num_inference_steps": 0}, "from 1 to 200"),
        ({"prompt": "a", "seed": -1}, "seed=-1 is not allowed"),
        ({"prompt": "a", "guidance_scale": 99.0}, "guidance_scale=99.0"),
    ],
)
def test_preview_request_validation(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        PreviewRequest(**kwargs)


def test_img2img_request_validation():
    image = Image.new("RGB", (32, 32))
    with pytest.raises(
        InvalidRequestError, match=r"strength=1.5 is not allowed: use a number from 0.0 to 1.0"
    ):
        Img2ImgRequest("a", image, 1.5)
    with pytest.raises(InvalidRequestError, match="image width=33"):
        Img2ImgRequest("a", Image.new("RGB", (33, 32)), 0.5)
    with pytest.raises(InvalidRequestError, match="must be a PIL image"):
        Img2ImgRequest("a", "not an image", 0.5)  # type: ignore[arg-type]


def test_prompt_longer_than_the_text_encoder_reads_is_refused(tiny_edge):
    long_prompt = " ".join(["cat"] * 40)
    with pytest.raises(
        InvalidRequestError, match=r"prompt is \d+ tokens long; model 'tiny-random-edge' reads at most 32"
    ):
        preview(tiny_edge, [PreviewRequest(long_prompt)])
