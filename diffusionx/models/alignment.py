"""Image-text alignment models: a `transformers.CLIPModel` that scores how well an image matches a prompt.

The strength predictors read it (`policy.features`): a preview that scores its prompt below a one-attribute
perturbation of that prompt is probably wrong in that attribute. Names resolve like the diffusion models':
`shapes-clip` ships inside the package (trained by `diffusionx train-clip`), `clip-vit-large-patch14` is
the production checkpoint (a hub id, or a local copy passed as a path), `tiny-random-clip` is built on
first use for tests, and any other string is a hub id or a local `save_pretrained` directory. Loading
always goes through `CLIPModel.from_pretrained`; a missing checkpoint raises `ModelNotAvailableError`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from cachetools import LRUCache
from PIL import Image

from diffusionx.imaging import image_key
from diffusionx.models.loading import ModelNotAvailableError, _not_available, select_device
from diffusionx.models.registry import PACKAGE_DIR, ModelSpec
from diffusionx.models.tiny_random import build_once, cache_dir

SHAPES_CLIP_DIR = PACKAGE_DIR / "models" / "shapes_clip"
IMAGE_CACHE_ENTRIES = 1024  # a few KB each: the recent sessions' previews
TINY_RANDOM_CLIP_VERSION = "v1"


@dataclass(frozen=True)
class AlignmentSpec:
    name: str
    source: str  # a hub id or a local save_pretrained directory
    description: str = ""


ALIGNMENT_MODELS: dict[str, AlignmentSpec] = {
    spec.name: spec
    for spec in (
        AlignmentSpec(
            "shapes-clip",
            str(SHAPES_CLIP_DIR),
            "CLIP of the embedded shapes world (ships inside the package; `diffusionx train-clip`).",
        ),
        AlignmentSpec(
            "clip-vit-large-patch14",
            "openai/clip-vit-large-patch14",
            "OpenAI CLIP ViT-L/14 (SD v1.5's text encoder's family): the production alignment model.",
        ),
        AlignmentSpec(
            "clip-vit-base-patch32", "openai/clip-vit-base-patch32", "OpenAI CLIP ViT-B/32 (smaller)."
        ),
        AlignmentSpec("tiny-random-clip", "", "Tiny randomly initialised CLIPModel for tests."),
    )
}


def get_alignment_spec(name_or_path: str) -> AlignmentSpec:
    """The registered spec (building `tiny-random-clip` on first use), else an ad-hoc hub id / path."""
    if not name_or_path or not name_or_path.strip():
        raise ValueError(
            f"alignment model must be a registered name ({', '.join(ALIGNMENT_MODELS)}), a hub id or a "
            "local path"
        )
    if name_or_path == "tiny-random-clip":
        directory = build_once(
            cache_dir() / f"tiny-random-clip-{TINY_RANDOM_CLIP_VERSION}",
            build_tiny_random_clip,
            "config.json",
        )
        return AlignmentSpec(name_or_path, str(directory))
    return ALIGNMENT_MODELS.get(name_or_path, AlignmentSpec(name_or_path, name_or_path))


class AlignmentModel:
    """A CLIPModel with its tokenizer and image processor; `similarity` is cosine similarity in [-1, 1].

    Text embeddings are cached (prompts and their perturbations repeat across requests), and so are image
    embeddings, by pixels (`imaging.image_key`): a served preview comes back as the input of the session's
    next edit, whose prediction then finds the embedding that `image_embeddings` made for it beforehand (the
    edge tier does that while it is idle, `engine.tiers.EdgeModel`). Thread-safe: one lock around the
    model, which serves one request batch at a time anyway, and one around the caches."""

    def __init__(self, name: str, model: Any, tokenizer: Any, processor: Any, device: torch.device) -> None:
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.processor = processor
        self.device = device
        self._text_cache: LRUCache[str, np.ndarray] = LRUCache(maxsize=65_536)
        self._image_cache: LRUCache[bytes, np.ndarray] = LRUCache(maxsize=IMAGE_CACHE_ENTRIES)
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()

    def clear_cache(self) -> None:
        """Forgets the cached embeddings (to time a prediction as a request with new prompts and images
        pays it)."""
        with self._cache_lock:
            self._text_cache.clear()
            self._image_cache.clear()

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, S, S) model inputs, exactly as the checkpoint's image processor prepares them."""
        rgb = [image.convert("RGB") for image in images]
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"]

    def text_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # padded to the longest text only: CLIP's text tower attends causally and pools at the end of the
        # text, so padding after it changes no embedding, and the shorter batch costs less
        return dict(
            self.tokenizer(
                list(texts),
                padding="longest",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
        )

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, D) unit vectors (cached per image)."""
        keys = [image_key(image.convert("RGB")) for image in images]
        vectors = self._cached(self._image_cache, keys)
        missing = [i for i, vector in enumerate(vectors) if vector is None]
        if missing:
            pixels = self.pixel_values([images[i] for i in missing]).to(self.device, self.model.dtype)
            with self._lock:
                out = self.model.get_image_features(pixel_values=pixels)
            with self._cache_lock:
                for i, vector in zip(missing, _unit(_features(out)), strict=True):
                    vectors[i] = self._image_cache[keys[i]] = vector
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return np.stack(cast(list[np.ndarray], vectors))  # every row filled above

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit vectors (cached per text)."""
        vectors = self._cached(self._text_cache, texts)
        missing = list(dict.fromkeys(t for t, vector in zip(texts, vectors, strict=True) if vector is None))
        if missing:
            inputs = {k: v.to(self.device) for k, v in self.text_inputs(missing).items()}
            with self._lock:
                out = self.model.get_text_features(**inputs)
            computed = dict(zip(missing, _unit(_features(out)), strict=True))
            with self._cache_lock:
                self._text_cache.update(computed)
            pairs = zip(texts, vectors, strict=True)
            vectors = [computed[t] if vector is None else vector for t, vector in pairs]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack(cast(list[np.ndarray], vectors))  # every row filled above

    def _cached(self, cache: LRUCache, keys: Sequence[Any]) -> list[np.ndarray | None]:
        with self._cache_lock:
            return [cache.get(key) for key in keys]

    def similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """(B, N) cosine similarity of every image to every text."""
        return self.image_embeddings(images) @ self.text_embeddings(texts).T


def clip_score(model: AlignmentModel, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
    """CLIPScore of each (image, text) pair: 100 * max(cosine similarity, 0) (Hessel et al., 2021, w = 1,
    as torchmetrics computes it): the quality column where no judge exists."""
    image_vectors = model.image_embeddings(images)
    text_vectors = model.text_embeddings(texts)
    return [
        float(100.0 * max(float(np.dot(i, t)), 0.0)) for i, t in zip(image_vectors, text_vectors, strict=True)
    ]


def default_alignment_model(family: str) -> str:
    """The alignment model that reads a model family's images: its own for the embedded and test
    families, the production CLIP for everything else."""
    return {"shapes": "shapes-clip", "tiny-random": "tiny-random-clip"}.get(family, "clip-vit-large-patch14")


def _features(output: Any) -> torch.Tensor:
    # transformers returns a tensor, or (newer versions) an output object holding the pooled projection
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor.float().cpu()


def _unit(vectors: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(vectors, dim=-1).numpy().astype(np.float32)


_loaded: dict[tuple[str, str], AlignmentModel] = {}
_loaded_lock = threading.Lock()


def load_alignment_model(name_or_path: str, device: str | torch.device | None = None) -> AlignmentModel:
    """Loads (once per process and device) a CLIP checkpoint by registered name, hub id or local path."""
    from huggingface_hub.errors import HFValidationError
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    spec = get_alignment_spec(name_or_path)
    torch_device = select_device(device)
    key = (spec.source, str(torch_device))
    with _loaded_lock:
        if key in _loaded:
            return _loaded[key]
    failure = ModelSpec(name=spec.name, source=spec.source, family="clip", tier="alignment")
    if (
        spec.source.startswith(("/", ".", "~"))
        and not (Path(spec.source).expanduser() / "config.json").exists()
    ):
        raise _not_available(failure, "no config.json there", tuple(ALIGNMENT_MODELS))
    try:
        model = CLIPModel.from_pretrained(spec.source).to(torch_device)
        tokenizer = CLIPTokenizer.from_pretrained(spec.source)
        processor = CLIPImageProcessor.from_pretrained(spec.source)
    except (OSError, HFValidationError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _not_available(failure, first_line, tuple(ALIGNMENT_MODELS)) from None
    loaded = AlignmentModel(spec.name, model, tokenizer, processor, torch_device)
    with _loaded_lock:
        return _loaded.setdefault(key, loaded)


def shapes_clip_configs(text_config: dict[str, Any], image_size: int = 32, patch_size: int = 4) -> Any:
    """The CLIPConfig of the shapes world's alignment model: a small ViT over `image_size` images (square
    patches of `patch_size` pixels) beside a text tower shaped like the shipped text encoder
    (`text_config`)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    width = int(text_config["hidden_size"])
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        projection_dim=width,
    )
    text = CLIPTextConfig(**{k: v for k, v in text_config.items() if k in CLIPTextConfig().to_dict()})
    return CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=width,
        logit_scale_init_value=2.6592,
    )


def image_processor(image_size: int) -> Any:
    """The image processor shipped with a CLIP of `image_size` pixels (resize, crop, scale to [-1, 1])."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        resample=3,  # bicubic; a no-op for images already at image_size
    )


def build_tiny_random_clip(directory: Path) -> None:
    """A tiny random CLIPModel with the tiny-random pipeline's tokenizer, in save_pretrained layout."""
    from transformers import CLIPModel, CLIPTokenizer

    from diffusionx.models.tiny_random import ensure_tiny_random

    tokenizer = CLIPTokenizer.from_pretrained(ensure_tiny_random(), subfolder="tokenizer")
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "projection_dim": 16,
    }
    torch.manual_seed(0)
    config = shapes_clip_configs(text, image_size=32)
    config.vision_config.num_hidden_layers = 1
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor(32).save_pretrained(directory)


__all__ = [
    "ALIGNMENT_MODELS",
    "AlignmentModel",
    "AlignmentSpec",
    "ModelNotAvailableError",
    "clip_score",
    "default_alignment_model",
    "get_alignment_spec",
    "load_alignment_model",
]
