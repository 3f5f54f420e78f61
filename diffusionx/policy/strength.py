"""Heuristic strength predictor: how much noise a preview needs before the cloud refines it.

The img2img strength `s` sets how far back into the noise schedule the cloud starts: `s = 1` regenerates
from scratch (N cloud steps), `s = 0` keeps the preview (no cloud step). This first predictor is a
documented heuristic (the learned predictor replaces it later, behind the same function):

    s = clip(base + w_noise * residual_noise(image) + w_detail * prompt_detail(prompt),
             s_min, s_max)

* `residual_noise` is the mean absolute Laplacian of the grey image, scaled to [0, 1]: a preview that
  still carries high-frequency noise from few edge steps needs more cloud denoising;
* `prompt_detail` grows with the number of content words (saturating at 12): prompts that ask for more
  need more of the cloud model's capacity;
* `s_min` keeps a minimum of cloud work (a refinement should always refine), `s_max` keeps some of the
  preview's layout, which the user has already approved.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

STOP_WORDS = frozenset(
    ["a", "an", "the", "of", "on", "in", "at", "and", "with", "to", "is", "are", "by", "for", "from"]
)


@dataclass(frozen=True)
class HeuristicStrengthConfig:
    base: float = 0.35  # strength for a clean preview of a one-word prompt
    w_noise: float = 0.35  # added for a preview that is pure high-frequency noise
    w_detail: float = 0.2  # added for a prompt with >= detail_words content words
    detail_words: int = 12
    s_min: float = 0.3
    s_max: float = 0.85


def residual_noise(image: Image.Image) -> float:
    """Mean |Laplacian| of the grey image in [0, 1] (0: flat; ~1: white noise)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if min(grey.shape) < 3:
        return 0.0
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    # the grey of uniform RGB noise has E|laplacian| ~ 0.75; normalise so that maps to ~1
    return float(min(1.0, np.abs(laplacian).mean() / 0.75))


def prompt_detail(prompt: str, detail_words: int = 12) -> float:
    words = [w for w in re.findall(r"[a-z0-9]+", prompt.lower()) if w not in STOP_WORDS]
    return min(1.0, len(words) / detail_words)


def predict_strength(prompt: str, image: Image.Image, config: HeuristicStrengthConfig | None = None) -> float:
    config = config or HeuristicStrengthConfig()
    strength = (
        config.base
        + config.w_noise * residual_noise(image)
        + config.w_detail * prompt_detail(prompt, config.detail_words)
    )
    return float(np.clip(strength, config.s_min, config.s_max))


# (prompt, previous image, previous prompt or None) -> edit strength
EditStrengthFunction = Callable[[str, Image.Image, str | None], float]


def heuristic_edit_strength(prompt: str, image: Image.Image, previous_prompt: str | None = None) -> float:
    """The heuristic's twin for edits: the same formula on the image to edit and the new prompt."""
    return predict_strength(prompt, image)
