"""A deterministic judge of whether an image matches a shapes caption (no learned weights).

Algorithm, on the image resized to 32x32:
1. Snap every pixel to the nearest palette colour (RGB distance); pixels far from every palette colour are
   left unlabelled.
2. Background = the most common label on the 1-pixel border.
3. For each shape in the caption, take the largest 4-connected component of pixels with its colour that is
   not the background. Too small a component (< MIN_AREA pixels) means the colour is absent, and then the
   shape's colour, size, position and kind all score 0.
4. Size: the component's larger bounding-box side against the midpoint of the small and large sides.
   Position: the centroid's nearest anchor in `data.POSITION_CENTERS`. Kind: the nearest of three
   prototypes in (fill ratio of the bounding box, share of the area in the box's upper half) space
   (`KIND_PROTOTYPES`).
5. Per-attribute scores average over the caption's shapes; "accuracy" is the mean of the five attributes
   and "exact" is 1 only when every attribute of every shape is right (the image matches the caption).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffusionx.shapes import data

JUDGE_SIZE = 32
MIN_AREA = 12  # pixels at 32x32; a small triangle has ~45
MAX_SNAP_DISTANCE = 110.0  # RGB distance beyond which a pixel matches no palette colour
ATTRIBUTES: tuple[str, ...] = ("kind", "colour", "size", "position", "background")
_PALETTE_RGB = np.array([data.PALETTE[c] for c in data.COLOURS], dtype=np.float32)  # (C, 3)


def label_image(image: Image.Image) -> np.ndarray:
    """(32, 32) int array of palette indices into data.COLOURS, -1 where no palette colour is near."""
    rgb = np.asarray(image.convert("RGB").resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BOX), np.float32)
    distances = np.linalg.norm(rgb[:, :, None, :] - _PALETTE_RGB[None, None], axis=-1)  # (32, 32, C)
    labels = distances.argmin(axis=-1)
    labels[distances.min(axis=-1) > MAX_SNAP_DISTANCE] = -1
    return labels


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected component of `mask` (all False when empty)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for start_y, start_x in zip(*np.nonzero(mask), strict=False):
        if seen[start_y, start_x]:
            continue
        seen[start_y, start_x] = True
        stack = [(int(start_y), int(start_x))]
        component = []
        while stack:
            y, x = stack.pop()
            component.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best, strict=False)
        out[list(ys), list(xs)] = True
    return out


# Prototype (fill ratio, fraction of the area in the upper half of the bounding box) per kind: a square
# fills its box, a circle fills pi/4 of it, an apex-up triangle half with a quarter on top. Fitted to both
# clean renders and blurry VAE reconstructions (whose squares lose corners and triangles round off); the
# upper-half share separates triangles best, so it is weighted more.
KIND_PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (0.93, 0.49),
    "circle": (0.79, 0.48),
    "triangle": (0.62, 0.31),
}
_TOP_SHARE_WEIGHT = 4.0


def kind_features(component: np.ndarray) -> tuple[float, float]:
    """(area / bounding-box area, share of the area above the box's middle row)."""
    ys, xs = np.nonzero(component)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    middle = (ys.min() + ys.max()) / 2
    return float(component.sum() / (height * width)), float((ys < middle).sum() / component.sum())


def classify_kind(component: np.ndarray) -> str:
    fill, top = kind_features(component)

    def distance(kind: str) -> float:
        proto_fill, proto_top = KIND_PROTOTYPES[kind]
        return (proto_fill - fill) ** 2 + _TOP_SHARE_WEIGHT * (proto_top - top) ** 2

    return min(KIND_PROTOTYPES, key=distance)


def classify_size(component: np.ndarray) -> str:
    ys, xs = np.nonzero(component)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / JUDGE_SIZE
    threshold = (data.SIZE_EXTENTS["small"] + data.SIZE_EXTENTS["large"]) / 2
    return "large" if extent >= threshold else "small"


def classify_position(component: np.ndarray) -> str:
    ys, xs = np.nonzero(component)
    cx, cy = (xs.mean() + 0.5) / JUDGE_SIZE, (ys.mean() + 0.5) / JUDGE_SIZE
    return min(
        data.POSITION_CENTERS,
        key=lambda p: (data.POSITION_CENTERS[p][0] - cx) ** 2 + (data.POSITION_CENTERS[p][1] - cy) ** 2,
    )


def background_colour(labels: np.ndarray) -> str | None:
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    border = border[border >= 0]
    if border.size == 0:
        return None
    return data.COLOURS[np.bincount(border, minlength=len(data.COLOURS)).argmax()]


def describe(image: Image.Image) -> dict:
    """What the judge sees: background and, per palette colour with a big enough component, its shape."""
    labels = label_image(image)
    background = background_colour(labels)
    shapes = {}
    for index, colour in enumerate(data.COLOURS):
        if colour == background:
            continue
        component = largest_component(labels == index)
        if component.sum() >= MIN_AREA:
            shapes[colour] = {
                "kind": classify_kind(component),
                "size": classify_size(component),
                "position": classify_position(component),
                "area": int(component.sum()),
            }
    return {"background": background, "shapes": shapes}


def score(image: Image.Image, caption: str) -> dict[str, float]:
    """Per-attribute scores in [0, 1] (kind, colour, size, position, background), their mean "accuracy",
    and "exact" (1.0 when every attribute is right, else 0.0).

    Raises ValueError when `caption` is not a grammar caption (see data.parse_caption)."""
    scene = data.parse_caption(caption)
    seen = describe(image)
    totals = dict.fromkeys(("kind", "colour", "size", "position"), 0.0)
    for shape in scene.shapes:
        found = seen["shapes"].get(shape.colour)
        if found is None:
            continue
        totals["colour"] += 1.0
        totals["kind"] += float(found["kind"] == shape.kind)
        totals["size"] += float(found["size"] == shape.size)
        totals["position"] += float(found["position"] == shape.position)
    result = {name: value / len(scene.shapes) for name, value in totals.items()}
    result["background"] = float(seen["background"] == scene.background)
    result["accuracy"] = float(np.mean([result[a] for a in ATTRIBUTES]))
    result["exact"] = float(all(result[a] == 1.0 for a in ATTRIBUTES))
    return result


def mean_scores(images: list[Image.Image], captions: list[str]) -> dict[str, float]:
    """Average of `score` over image/caption pairs."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scores = [score(image, text) for image, text in zip(images, captions, strict=False)]
    return {key: float(np.mean([s[key] for s in scores])) for key in (*ATTRIBUTES, "accuracy", "exact")}
