"""The deterministic shapes judge: right on held-out renders, near chance on noise and wrong captions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusionx.shapes import data, judge

N = 240


@pytest.fixture(scope="module")
def heldout():
    scenes = data.heldout_scenes(N, seed=7)
    return [data.caption(s) for s in scenes], [data.render(s) for s in scenes]


def test_judge_accepts_heldout_renders(heldout):
    captions, images = heldout
    scores = judge.mean_scores(images, captions)
    print("held-out renders:", scores)
    assert scores["accuracy"] >= 0.95
    assert all(scores[a] >= 0.9 for a in judge.ATTRIBUTES)


def test_judge_works_at_other_sizes_and_on_blurred_images(heldout):
    captions, images = heldout
    big = [image.resize((96, 96), Image.Resampling.BICUBIC) for image in images]
    soft = [image.filter(ImageFilter.GaussianBlur(0.6)) for image in images]
    big_scores, soft_scores = judge.mean_scores(big, captions), judge.mean_scores(soft, captions)
    print("96x96:", big_scores, "blurred:", soft_scores)
    assert big_scores["accuracy"] >= 0.95
    assert soft_scores["accuracy"] >= 0.9


def test_judge_is_near_chance_on_noise_and_wrong_captions(heldout):
    captions, images = heldout
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(N)]
    # A random other caption for each image (shift by 1..N-1 so it is never the image's own).
    wrong = [captions[(i + 1 + rng.integers(N - 1)) % N] for i in range(N)]
    fallback = data.caption(data.heldout_scenes(1, seed=99)[0])
    wrong = [w if w != c else fallback for w, c in zip(wrong, captions, strict=True)]
    noise_scores, wrong_scores = judge.mean_scores(noise, captions), judge.mean_scores(images, wrong)
    print("noise:", noise_scores, "wrong captions:", wrong_scores)
    assert noise_scores["accuracy"] < 0.3
    assert wrong_scores["accuracy"] < 0.4


def test_judge_scores_each_attribute():
    scene = data.Scene(
        (data.Shape("circle", "red", "large", "left"), data.Shape("square", "blue", "small", "right")),
        background="white",
    )
    image = data.render(scene)
    assert judge.score(image, data.caption(scene)) == {
        "kind": 1.0,
        "colour": 1.0,
        "size": 1.0,
        "position": 1.0,
        "background": 1.0,
        "accuracy": 1.0,
        "exact": 1.0,
    }
    # Wrong kind for the first shape and wrong background: half the kind score, background 0.
    caption = "a large red triangle on the left and a small blue square on the right, black background"
    result = judge.score(image, caption)
    assert result["kind"] == 0.5 and result["background"] == 0.0 and result["colour"] == 1.0
    assert result["accuracy"] == pytest.approx((0.5 + 1 + 1 + 1 + 0) / 5)
    assert result["exact"] == 0.0
    # Only the positions swapped: accuracy stays high, but the image does not match its caption.
    swapped = "a large red circle on the right and a small blue square on the left, white background"
    result = judge.score(image, swapped)
    assert result["position"] == 0.0 and result["accuracy"] == pytest.approx(0.8) and result["exact"] == 0.0
    # An absent colour scores 0 for all of that shape's attributes.
    result = judge.score(image, "a large green circle on the left, white background")
    assert result["colour"] == result["kind"] == result["size"] == result["position"] == 0.0


def test_judge_is_deterministic(heldout):
    captions, images = heldout
    rng = np.random.default_rng(1)
    noisy = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    for image, caption in zip(images[:20] + noisy, captions[:40], strict=True):
        assert judge.score(image, caption) == judge.score(image.copy(), caption)


def test_judge_rejects_non_grammar_captions():
    image = data.render(data.heldout_scenes(1)[0])
    with pytest.raises(ValueError, match="background"):
        judge.score(image, "a photo of a cat")
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        judge.mean_scores([image, image], ["a large red circle on the left, blue background"])
