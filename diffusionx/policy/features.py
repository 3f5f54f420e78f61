"""Inputs of the learned strength predictors: features of an image, of its prompt and of the prompt's history.

One feature vector per (prompt, image, previous_prompt), concatenated in this order:

* pixels: the image box-filtered to 4x4 RGB in [0, 1] (48: coarse layout), its colour histogram over 3 bins
  per channel (27: which colours are present, and how much of each) and its residual noise (1, the
  heuristic's mean |Laplacian|: how far the preview still is from a clean image);
* prompt: the mean over real tokens of the shipped text encoder's last hidden state (D);
* change: the text encoder's states of the new prompt at the token positions where it differs from the
  previous prompt, averaged (D: what changed, in context: "blue" before "background" is not "blue" before
  "circle"), and the share of words that differ (1); for a request without history (a finalize) the
  previous prompt is the prompt itself, so both are 0.

* alignment (when the predictor names an alignment model, `models.alignment`): the CLIP similarity of the
  image to the prompt, its margin against each attribute's one-attribute perturbations of the prompt
  (`shapes.perturb`: similarity to the prompt minus the best-scoring perturbation; 0 where the prompt has
  none) and the smallest of those margins (ALIGNMENT_FEATURES: a negative margin says which attribute looks
  wrong). The refine predictor reads the final preview against the prompt, the edit predictor the previous
  image against the new prompt.

A predictor reads one of two feature sets (`FEATURE_SETS`, named in its config): `full`, all of the above
(the shipped predictors), or `alignment`, only the residual noise and the alignment features (what the
CLIP sees of the image against the prompt, and how far the image still is from a clean one), which
`predictor train --refine-features alignment` trains (docs/results.md#strength-predictors compares them).

The text encoder is the one a model family ships (`TextEmbedder.load("shapes-cloud")`), so a predictor
reads prompts exactly as the diffusion models of that family do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from diffusionx.policy.strength import residual_noise
from diffusionx.sampling.generation import tokenize
from diffusionx.shapes.perturb import ATTRIBUTES, perturbations

if TYPE_CHECKING:
    from diffusionx.models.alignment import AlignmentModel

IMAGE_GRID = 4  # layout features: IMAGE_GRID x IMAGE_GRID RGB
COLOUR_BINS = 3  # colour histogram: COLOUR_BINS per channel
IMAGE_FEATURES = 3 * IMAGE_GRID**2 + COLOUR_BINS**3 + 1


def image_features(image: Image.Image) -> np.ndarray:
    """(IMAGE_FEATURES,) float32: the RGB thumbnail, the colour histogram and the residual noise."""
    rgb = image.convert("RGB")
    thumbnail = rgb.resize((IMAGE_GRID, IMAGE_GRID), Image.Resampling.BOX)
    pixels = np.asarray(thumbnail, dtype=np.float32).reshape(-1) / 255.0
    bins = np.minimum(np.asarray(rgb, dtype=np.int32) * COLOUR_BINS // 256, COLOUR_BINS - 1)  # (H, W, 3)
    codes = (bins[..., 0] * COLOUR_BINS + bins[..., 1]) * COLOUR_BINS + bins[..., 2]
    histogram = np.bincount(codes.reshape(-1), minlength=COLOUR_BINS**3).astype(np.float32) / codes.size
    return np.concatenate([pixels, histogram, np.array([residual_noise(rgb)], np.float32)])


def word_change(previous_prompt: str, prompt: str) -> float:
    """Share of words that differ between two prompts (symmetric difference of word multisets / total)."""
    before = re.findall(r"[a-z0-9]+", previous_prompt.lower())
    after = re.findall(r"[a-z0-9]+", prompt.lower())
    if not before and not after:
        return 0.0
    removed = sum(max(0, before.count(w) - after.count(w)) for w in set(before))
    added = sum(max(0, after.count(w) - before.count(w)) for w in set(after))
    return (removed + added) / (len(before) + len(after))


@dataclass
class TextEmbedder:
    """Mean-pooled text embeddings from a model family's tokenizer and text encoder."""

    tokenizer: Any
    text_encoder: Any
    source: str  # the registry name the encoder was loaded from

    @classmethod
    def load(cls, name: str) -> TextEmbedder:
        """The tokenizer and text encoder of registry model `name` (on the CPU, float32)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        from diffusionx.models.loading import _load_component
        from diffusionx.models.registry import get_spec

        spec = get_spec(name)
        device = torch.device("cpu")
        tokenizer = _load_component(CLIPTokenizer, spec, "tokenizer", device, torch.float32)
        text_encoder = _load_component(CLIPTextModel, spec, "text_encoder", device, torch.float32)
        return cls(tokenizer, text_encoder, name)

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def _tokens(self, prompts: Sequence[str]) -> Any:
        return tokenize(
            self.tokenizer,
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )

    def token_ids(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, L) token ids of padded prompts, as `encode` gives them (without running the encoder)."""
        return self._tokens(prompts).input_ids.numpy()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hidden (B, L, D), token ids (B, L), attention mask (B, L)) of padded prompts."""
        batch = self._tokens(prompts)
        hidden = self.text_encoder(batch.input_ids).last_hidden_state.float()
        return hidden.numpy(), batch.input_ids.numpy(), batch.attention_mask.numpy()

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, D) float32: the last hidden state averaged over each prompt's real (non-padding) tokens."""
        hidden, _, mask = self.encode(prompts)
        return _masked_mean(hidden, mask)


def _masked_mean(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)  # (B, L, 1)
    return ((hidden * weights).sum(1) / np.maximum(weights.sum(1), 1.0)).astype(np.float32)


ALIGNMENT_FEATURES = 2 + len(ATTRIBUTES)  # similarity, a margin per attribute, the smallest margin
FEATURE_SETS = ("full", "alignment")  # see the module docstring


def feature_dim(text_dim: int, alignment: bool = False, feature_set: str = "full") -> int:
    check_feature_set(feature_set, alignment)
    if feature_set == "alignment":
        return 1 + ALIGNMENT_FEATURES
    return IMAGE_FEATURES + 2 * text_dim + 1 + (ALIGNMENT_FEATURES if alignment else 0)


def check_feature_set(feature_set: str, alignment: bool) -> None:
    """Refuses an unknown feature set, and `alignment` without an alignment model to read."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature set {feature_set!r} is not one of {list(FEATURE_SETS)}")
    if feature_set == "alignment" and not alignment:
        raise ValueError("feature set 'alignment' needs an alignment model (a predictor that names one)")


def alignment_features(
    model: AlignmentModel, prompts: Sequence[str], images: Sequence[Image.Image]
) -> np.ndarray:
    """(B, ALIGNMENT_FEATURES) float32: similarity, margins per attribute, smallest margin."""
    image_vectors = model.image_embeddings(images)  # (B, D)
    options = [perturbations(prompt) for prompt in prompts]
    texts = [
        [prompt, *(t for a in ATTRIBUTES for t in option[a])]
        for prompt, option in zip(prompts, options, strict=True)
    ]
    vectors = model.text_embeddings([t for row in texts for t in row])  # one batch for every request
    rows, offset = [], 0
    for vector, option, row in zip(image_vectors, options, texts, strict=True):
        scores = vectors[offset : offset + len(row)] @ vector  # (1 + P,): the prompt, then its perturbations
        offset += len(row)
        margins, start = [], 1
        for attribute in ATTRIBUTES:
            count = len(option[attribute])
            margins.append(float(scores[0] - scores[start : start + count].max()) if count else 0.0)
            start += count
        rows.append([float(scores[0]), *margins, min(margins)])
    return np.asarray(rows, np.float32).reshape(len(prompts), ALIGNMENT_FEATURES)


def build_features(
    embedder: TextEmbedder,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    previous_prompts: Sequence[str | None] | None = None,
    alignment: AlignmentModel | None = None,
    feature_set: str = "full",
) -> np.ndarray:
    """(B, feature_dim) float32 feature matrix of `feature_set` (see the module docstring); the alignment
    features last, when an alignment model is given."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    check_feature_set(feature_set, alignment is not None)
    if feature_set == "alignment":
        assert alignment is not None  # checked above
        noise = np.array([[residual_noise(image.convert("RGB"))] for image in images], np.float32)
        return np.concatenate([noise, alignment_features(alignment, prompts, images)], axis=1)
    previous = [
        p if p is not None else prompt
        for p, prompt in zip(previous_prompts or [None] * len(prompts), prompts, strict=True)
    ]
    hidden, ids, mask = embedder.encode(list(prompts))
    previous_ids = embedder.token_ids(previous)
    changed_positions = (ids != previous_ids) & (mask > 0)  # (B, L): tokens that differ, position by position
    pixels = np.stack([image_features(image) for image in images])
    changed = np.array([[word_change(b, a)] for b, a in zip(previous, prompts, strict=True)], np.float32)
    parts = [pixels, _masked_mean(hidden, mask), _masked_mean(hidden, changed_positions), changed]
    if alignment is not None:
        parts.append(alignment_features(alignment, prompts, images))
    return np.concatenate(parts, axis=1).astype(np.float32)
