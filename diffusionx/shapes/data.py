"""The shapes world: procedural scenes of one or two coloured shapes, their captions, and user sessions.

A scene is a background colour plus one or two shapes, each with a kind, colour, size and position. The
caption grammar is small and exactly invertible:

    caption    := shape_phrase [" and " shape_phrase] ", " COLOUR " background"
    shape_phrase := "a " SIZE " " COLOUR " " KIND " " PLACE
    PLACE      := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"

Everything is deterministic given a seed (numpy Generator streams), uses only numpy + PIL, and renders at
32x32 by default (4x supersampled, then box-filtered, so edges are smooth but colours stay clean).
Two shapes in a scene always have different colours, neither equals the background, and their boxes do not
overlap, so each shape is identifiable by colour alone (the judge relies on this).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# name -> RGB. Chosen to be far apart in RGB so nearest-colour snapping is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (150, 50, 200),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

# Positions as the (x, y) centre in units of the image side; sizes as the shape's side in the same units.
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "left": (0.23, 0.5),
    "right": (0.77, 0.5),
    "top": (0.5, 0.23),
    "bottom": (0.5, 0.77),
    "center": (0.5, 0.5),
}
SIZE_EXTENTS: dict[str, float] = {"small": 0.30, "large": 0.46}
PLACE_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
TWO_SHAPE_PROBABILITY = 0.4
CHANGE_KINDS: tuple[str, ...] = ("colour", "add", "move", "background", "size", "kind")

# Seed streams: training scenes and held-out prompts come from disjoint numpy SeedSequence streams.
TRAIN_STREAM = 0
HELDOUT_STREAM = 1
SESSION_STREAM = 2


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    position: str  # one of POSITIONS

    def __post_init__(self) -> None:
        for field, allowed in (
            ("kind", KINDS),
            ("colour", COLOURS),
            ("size", SIZES),
            ("position", POSITIONS),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"Shape {field}={value!r} is not one of {list(allowed)}")


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str  # one of COLOURS

    def __post_init__(self) -> None:
        if self.background not in COLOURS:
            raise ValueError(f"Scene background={self.background!r} is not one of {list(COLOURS)}")
        if not 1 <= len(self.shapes) <= 2:
            raise ValueError(f"Scene has {len(self.shapes)} shapes; allowed are 1 or 2")

    def problems(self) -> list[str]:
        """Why the scene is not well-formed for rendering and judging (empty when it is)."""
        out = []
        colours = [s.colour for s in self.shapes]
        if self.background in colours:
            out.append(f"a shape has the background colour {self.background!r}")
        if len(set(colours)) != len(colours):
            out.append(f"two shapes share the colour {colours[0]!r}")
        if len(self.shapes) == 2 and _boxes_overlap(self.shapes[0], self.shapes[1]):
            out.append(f"shapes at {self.shapes[0].position!r} and {self.shapes[1].position!r} overlap")
        return out


def shape_box(shape: Shape, size: int = 32) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in pixels of the square a shape is drawn in."""
    cx, cy = POSITION_CENTERS[shape.position]
    half = SIZE_EXTENTS[shape.size] / 2
    return ((cx - half) * size, (cy - half) * size, (cx + half) * size, (cy + half) * size)


def _boxes_overlap(a: Shape, b: Shape, margin: float = 1.0) -> bool:
    ax0, ay0, ax1, ay1 = shape_box(a)
    bx0, by0, bx1, by1 = shape_box(b)
    return ax0 < bx1 + margin and bx0 < ax1 + margin and ay0 < by1 + margin and by0 < ay1 + margin


def _random_shape(rng: np.random.Generator, colour: str | None = None, position: str | None = None) -> Shape:
    return Shape(
        kind=KINDS[rng.integers(len(KINDS))],
        colour=colour if colour is not None else COLOURS[rng.integers(len(COLOURS))],
        size=SIZES[rng.integers(len(SIZES))],
        position=position if position is not None else POSITIONS[rng.integers(len(POSITIONS))],
    )


def random_scene(rng: np.random.Generator, two_shape_probability: float = TWO_SHAPE_PROBABILITY) -> Scene:
    """A random well-formed scene (rejection sampling, so it is deterministic given the generator)."""
    n_shapes = 2 if rng.random() < two_shape_probability else 1
    while True:
        background = COLOURS[rng.integers(len(COLOURS))]
        shapes = tuple(_random_shape(rng) for _ in range(n_shapes))
        scene = Scene(shapes=shapes, background=background)
        if not scene.problems():
            return scene


def render(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """Draws the scene as an RGB image of `size` x `size` pixels."""
    big = size * supersample
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0, x1, y1 = (v * supersample for v in shape_box(shape, size))
        fill = PALETTE[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle: apex up, base at the bottom of the box
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    if supersample == 1:
        return image
    return image.resize((size, size), Image.Resampling.BOX)


def _shape_phrase(shape: Shape) -> str:
    return f"a {shape.size} {shape.colour} {shape.kind} {PLACE_PHRASES[shape.position]}"


def caption(scene: Scene) -> str:
    """'a large red circle on the left, blue background' (shapes joined by ' and ')."""
    return " and ".join(_shape_phrase(s) for s in scene.shapes) + f", {scene.background} background"


_PLACE_TO_POSITION = {phrase: position for position, phrase in PLACE_PHRASES.items()}
_SHAPE_RE = re.compile(
    r"a (?P<size>\w+) (?P<colour>\w+) (?P<kind>\w+) (?P<place>on the left|on the right|at the top"
    r"|at the bottom|in the center)"
)


def parse_caption(text: str) -> Scene:
    """Exact inverse of `caption` for grammar captions; raises ValueError naming the problem otherwise."""
    normalised = " ".join(text.strip().lower().split())
    body, sep, tail = normalised.rpartition(", ")
    if not sep:
        raise ValueError(f"Caption {text!r} has no ', <colour> background' ending")
    tail_words = tail.split()
    if len(tail_words) != 2 or tail_words[1] != "background":
        raise ValueError(f"Caption {text!r} must end with ', <colour> background', got {tail!r}")
    if tail_words[0] not in COLOURS:
        raise ValueError(
            f"Caption {text!r}: background colour {tail_words[0]!r} is not one of {list(COLOURS)}"
        )
    phrases = body.split(" and ")
    if len(phrases) > 2:
        raise ValueError(f"Caption {text!r} has {len(phrases)} shapes; at most 2 are allowed")
    shapes = []
    for phrase in phrases:
        match = _SHAPE_RE.fullmatch(phrase)
        if match is None:
            raise ValueError(
                f"Caption {text!r}: shape phrase {phrase!r} is not 'a <size> <colour> <kind> <place>' with "
                f"place one of {list(PLACE_PHRASES.values())}"
            )
        for field, allowed in (("size", SIZES), ("colour", COLOURS), ("kind", KINDS)):
            if match[field] not in allowed:
                raise ValueError(f"Caption {text!r}: {field} {match[field]!r} is not one of {list(allowed)}")
        shapes.append(
            Shape(
                kind=match["kind"],
                colour=match["colour"],
                size=match["size"],
                position=_PLACE_TO_POSITION[match["place"]],
            )
        )
    return Scene(shapes=tuple(shapes), background=tail_words[0])


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the tokenizer makes each one a single token)."""
    words = {"a", "and", "background", ","}
    words.update(COLOURS, KINDS, SIZES)
    for phrase in PLACE_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


def scene_rng(seed: int, stream: int) -> np.random.Generator:
    """The generator for one seed stream (TRAIN_STREAM, HELDOUT_STREAM, SESSION_STREAM)."""
    return np.random.default_rng([stream, seed])


def training_scenes(
    n: int, seed: int = 0, two_shape_probability: float = TWO_SHAPE_PROBABILITY
) -> list[Scene]:
    """Training scenes; a higher `two_shape_probability` than the held-out mix gives the model more
    examples of binding each place phrase to its own shape (held-out prompts keep TWO_SHAPE_PROBABILITY)."""
    if not 0.0 <= two_shape_probability <= 1.0:
        raise ValueError(f"two_shape_probability={two_shape_probability} must be in [0, 1]")
    rng = scene_rng(seed, TRAIN_STREAM)
    return [random_scene(rng, two_shape_probability) for _ in range(n)]


def heldout_scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = scene_rng(seed, HELDOUT_STREAM)
    return [random_scene(rng) for _ in range(n)]


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """Captions drawn from a seed stream disjoint from training's (the scene space is finite, so a caption
    can coincide with a training one; the images the model is judged on are its own)."""
    return [caption(s) for s in heldout_scenes(n, seed)]


# --- sessions -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionStep:
    prompt: str
    scene: Scene
    change: str | None  # None for the first round, else one of CHANGE_KINDS
    shape_index: int | None  # which shape the change touched (None for background / first round)


def diff_scenes(before: Scene, after: Scene) -> list[str]:
    """Names of what changed: 'background', 'add', 'remove', or per-shape 'colour'/'size'/'kind'/'move'."""
    changes = []
    if before.background != after.background:
        changes.append("background")
    if len(after.shapes) > len(before.shapes):
        changes.append("add")
    elif len(after.shapes) < len(before.shapes):
        changes.append("remove")
    for a, b in zip(before.shapes, after.shapes, strict=False):
        for field, name in (("colour", "colour"), ("size", "size"), ("kind", "kind"), ("position", "move")):
            if getattr(a, field) != getattr(b, field):
                changes.append(name)
    return changes


def _propose_change(rng: np.random.Generator, scene: Scene) -> tuple[Scene, str, int | None]:
    change = CHANGE_KINDS[rng.integers(len(CHANGE_KINDS))]
    if change == "add" and len(scene.shapes) == 2:
        change = "colour"
    if change == "background":
        return dataclasses.replace(scene, background=COLOURS[rng.integers(len(COLOURS))]), change, None
    if change == "add":
        return dataclasses.replace(scene, shapes=(*scene.shapes, _random_shape(rng))), change, 1
    index = int(rng.integers(len(scene.shapes)))
    old = scene.shapes[index]
    if change == "colour":
        new = dataclasses.replace(old, colour=COLOURS[rng.integers(len(COLOURS))])
    elif change == "move":
        new = dataclasses.replace(old, position=POSITIONS[rng.integers(len(POSITIONS))])
    elif change == "size":
        new = dataclasses.replace(old, size="small" if old.size == "large" else "large")
    else:
        new = dataclasses.replace(old, kind=KINDS[rng.integers(len(KINDS))])
    shapes = list(scene.shapes)
    shapes[index] = new
    return dataclasses.replace(scene, shapes=tuple(shapes)), change, index


def make_session_steps(n: int, rounds: int, seed: int = 0) -> list[list[SessionStep]]:
    """`n` sessions of `rounds` prompts; each round after the first makes exactly one change."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    rng = scene_rng(seed, SESSION_STREAM)
    sessions = []
    for _ in range(n):
        scene = random_scene(rng, two_shape_probability=0.0 if rng.random() < 0.7 else 1.0)
        steps = [SessionStep(caption(scene), scene, None, None)]
        while len(steps) < rounds:
            new, change, index = _propose_change(rng, scene)
            # Keep only well-formed scenes that differ in exactly the one intended way.
            if new.problems() or diff_scenes(scene, new) != [change]:
                continue
            scene = new
            steps.append(SessionStep(caption(scene), scene, change, index))
        sessions.append(steps)
    return sessions


def make_sessions(n: int, rounds: int, seed: int = 0) -> list[list[str]]:
    """Prompt sequences like a user's rounds; `diff_scenes(parse_caption(a), parse_caption(b))` names the
    single change between consecutive prompts (or use `make_session_steps` for it directly)."""
    return [[step.prompt for step in steps] for steps in make_session_steps(n, rounds, seed)]
