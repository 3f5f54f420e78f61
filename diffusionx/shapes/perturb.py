"""One-attribute perturbations of a prompt: the hard negatives of the alignment model and its features.

For a shapes-grammar caption every perturbation is exact: the same scene with one attribute of one shape
(colour, kind, size, position) or the background changed, kept well-formed (`Scene.problems`); for a pair
of shapes, "position" includes swapping the two positions. For any other prompt (a real user's) the same
attribute classes are found by word: a colour word replaced by another colour, "small" by "large" and so
on; attributes with no such word have no perturbation.
"""

from __future__ import annotations

import dataclasses
import re

from diffusionx.shapes.data import COLOURS, KINDS, POSITIONS, SIZES, Scene, caption, parse_caption

ATTRIBUTES: tuple[str, ...] = ("kind", "colour", "size", "position", "background")

# word classes for prompts outside the grammar
_WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "colour": (*COLOURS, "orange", "pink", "brown", "grey", "gray"),
    "size": ("small", "large", "big", "tiny", "huge"),
    "position": ("left", "right", "top", "bottom", "center", "middle"),
    "kind": (*KINDS, "cat", "dog", "house", "tree", "car", "person", "bird", "flower"),
}


def perturbations(prompt: str) -> dict[str, list[str]]:
    """attribute -> distinct prompts that differ from `prompt` in that attribute only (never `prompt`)."""
    try:
        scene = parse_caption(prompt)
    except ValueError:
        return _word_perturbations(prompt)
    out = {attribute: _unique(_scene_perturbations(scene, attribute), prompt) for attribute in ATTRIBUTES}
    return out


def _unique(scenes: list[Scene], prompt: str) -> list[str]:
    texts = dict.fromkeys(caption(s) for s in scenes if not s.problems())
    texts.pop(prompt, None)
    return list(texts)


def _scene_perturbations(scene: Scene, attribute: str) -> list[Scene]:
    if attribute == "background":
        return [dataclasses.replace(scene, background=c) for c in COLOURS if c != scene.background]
    field, values = {
        "kind": ("kind", KINDS),
        "colour": ("colour", COLOURS),
        "size": ("size", SIZES),
        "position": ("position", POSITIONS),
    }[attribute]
    out = []
    for index, shape in enumerate(scene.shapes):
        for value in values:
            if value != getattr(shape, field):
                shapes = list(scene.shapes)
                shapes[index] = dataclasses.replace(shape, **{field: value})
                out.append(dataclasses.replace(scene, shapes=tuple(shapes)))
    if attribute == "position" and len(scene.shapes) == 2:
        first, second = scene.shapes
        swapped = (
            dataclasses.replace(first, position=second.position),
            dataclasses.replace(second, position=first.position),
        )
        out.insert(0, dataclasses.replace(scene, shapes=swapped))
    return out


def _word_perturbations(prompt: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {attribute: [] for attribute in ATTRIBUTES}
    tokens = re.split(r"(\W+)", prompt)
    lowered = [t.lower() for t in tokens]
    for attribute, words in _WORD_CLASSES.items():
        for index, token in enumerate(lowered):
            if token not in words:
                continue
            for other in words:
                if other != token:
                    changed = [*tokens[:index], other, *tokens[index + 1 :]]
                    out[attribute].append("".join(changed))
    # a colour right before "background" is the background's, not a shape's
    background = re.compile(r"\b(\w+)(\s+background)\b", re.IGNORECASE)
    out["background"] = [
        p for p in out["colour"] if _background_word(p, background) != _background_word(prompt, background)
    ]
    out["colour"] = [p for p in out["colour"] if p not in out["background"]]
    return {attribute: list(dict.fromkeys(texts)) for attribute, texts in out.items()}


def _background_word(prompt: str, pattern: re.Pattern[str]) -> str | None:
    match = pattern.search(prompt)
    return match.group(1).lower() if match else None
