"""What the strength predictors aim for: the strength grids, and when a refinement or an edit is good enough.

Quality is the shapes judge's (`shapes.judge.score`): per-attribute scores, their mean "accuracy", and
exact match (accuracy 1).

* Refine: a refinement at strength s reaches the target when its judge accuracy on the final prompt is at
  least that of a full cloud generation (text-to-image, the cloud's default steps) of the same prompt and
  seed. The refine label is the smallest grid strength that reaches it (1.0 when none does).
* Edit: an edit of the previous image toward the new prompt is good ("ok") when it satisfies the new prompt
  (the changed attribute scores 1 on the new prompt: every shape has it right) while keeping what the
  prompt did not change (every other attribute scores at least what the previous image scored on the
  previous prompt: what was right stays right). The edit label is the smallest grid strength whose edit is
  ok (1.0 when none is).
"""

from __future__ import annotations

from diffusionx.shapes.judge import ATTRIBUTES

# candidate refine strengths: int(20 * s) = 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 17, 20 cloud calls at N = 20
REFINE_GRID: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0)
# candidate edit strengths: int(8 * s) = 2, 4, 6, 8 edge calls at the edge's 8 edit steps (every edit of the
# grid is run, so a finer grid multiplies the labelling cost)
EDIT_GRID: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
FIXED_STRENGTHS: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)  # the fixed baselines of `predictor eval`
# a method reaches the refine target when its mean accuracy is within this of the full cloud generation's
TARGET_MARGIN = 0.01
# The refine predictor learns the label, but at least this strength for a preview the judge finds wrong.
# The label alone says how much refinement reaches the cloud's own accuracy on the prompt, and on the label
# sessions 124 of 196 wrong previews reach it at 0.05-0.1: the cloud's full generation gets the same
# attribute wrong there, so refining lightly loses nothing against it. But a light refinement keeps the
# preview wrong for sure, while one at 0.3 (6 of 20 steps) redraws shapes and gives the cloud a chance to
# get them right; and a predictor that learns the label alone cannot tell a wrong preview from a right one
# by its strength (the labels themselves rank wrong previews at ROC AUC 0.85). The predictor is served
# without the judge: it reads the preview through the alignment model (`policy.features`).
WRONG_PREVIEW_MIN_STRENGTH = 0.3

# the judge attribute a session change touches ("add" brings a shape: its colour must appear)
CHANGE_ATTRIBUTE: dict[str, str] = {
    "colour": "colour",
    "move": "position",
    "background": "background",
    "size": "size",
    "kind": "kind",
    "add": "colour",
}


def refine_reached(accuracy: float, cloud_accuracy: float) -> bool:
    return accuracy >= cloud_accuracy - 1e-9


def edit_ok(edited: dict[str, float], previous: dict[str, float], change: str) -> bool:
    """`edited`: judge scores of the edit on the new prompt; `previous`: of the previous image on the
    previous prompt; `change`: the session's change kind (see the module docstring)."""
    changed = CHANGE_ATTRIBUTE[change]
    if edited[changed] < 1.0 - 1e-9:
        return False
    return all(edited[a] >= previous[a] - 1e-9 for a in ATTRIBUTES if a != changed)


def smallest(grid: tuple[float, ...], good: list[bool]) -> tuple[float, bool]:
    """(the smallest grid strength that is good, True), or (grid[-1], False) when none is."""
    for strength, is_good in zip(grid, good, strict=False):
        if is_good:
            return strength, True
    return grid[-1], False
