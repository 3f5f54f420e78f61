"""The procedural shapes world: determinism, the caption grammar, held-out prompts and sessions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffusionx.shapes import data


def test_scenes_and_images_are_deterministic_by_seed():
    a = data.training_scenes(50, seed=3)
    b = data.training_scenes(50, seed=3)
    c = data.training_scenes(50, seed=4)
    assert a == b
    assert a != c
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(data.render(x)), np.asarray(data.render(y)))


def test_render_size_and_colours():
    scene = data.Scene((data.Shape("square", "red", "large", "center"),), background="blue")
    image = np.asarray(data.render(scene))
    assert image.shape == (32, 32, 3)
    assert tuple(image[16, 16]) == data.PALETTE["red"]
    assert tuple(image[0, 0]) == data.PALETTE["blue"]
    assert data.render(scene, size=64).size == (64, 64)


def test_scenes_are_well_formed_and_mix_one_and_two_shapes():
    scenes = data.training_scenes(1000)
    assert all(not s.problems() for s in scenes)
    n_two = sum(len(s.shapes) == 2 for s in scenes)
    assert 300 < n_two < 500  # TWO_SHAPE_PROBABILITY = 0.4


def test_training_mix_of_two_shape_scenes_is_configurable():
    assert {len(s.shapes) for s in data.training_scenes(50, two_shape_probability=1.0)} == {2}
    assert {len(s.shapes) for s in data.training_scenes(50, two_shape_probability=0.0)} == {1}
    default_mix = data.training_scenes(20, two_shape_probability=data.TWO_SHAPE_PROBABILITY)
    assert data.training_scenes(20) == default_mix
    with pytest.raises(ValueError, match=r"two_shape_probability=1\.5"):
        data.training_scenes(1, two_shape_probability=1.5)


def test_caption_round_trip_and_examples():
    for scene in data.training_scenes(500) + data.heldout_scenes(500):
        assert data.parse_caption(data.caption(scene)) == scene
    scene = data.Scene((data.Shape("circle", "red", "large", "left"),), background="blue")
    assert data.caption(scene) == "a large red circle on the left, blue background"
    two = data.parse_caption(
        "a small green square at the top and a large yellow triangle at the bottom, black background"
    )
    assert two.shapes[1] == data.Shape("triangle", "yellow", "large", "bottom")
    assert two.background == "black"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a large red circle on the left", "background"),
        ("a large red circle on the left, teal background", "'teal'"),
        ("a huge red circle on the left, blue background", "'huge'"),
        ("a large red hexagon on the left, blue background", "'hexagon'"),
        ("a large red circle somewhere, blue background", "shape phrase"),
        (
            "a small red circle on the left and a small blue square on the right and a small green circle "
            "at the top, black background",
            "3 shapes",
        ),
    ],
)
def test_parse_caption_errors_name_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        data.parse_caption(text)


def test_vocabulary_covers_every_caption_word():
    vocabulary = set(data.vocabulary())
    for scene in data.training_scenes(300):
        assert set(data.caption(scene).replace(",", " ,").split()) <= vocabulary


def test_heldout_prompts_come_from_a_different_stream():
    train = [data.caption(s) for s in data.training_scenes(200, seed=0)]
    heldout = data.heldout_prompts(200, seed=0)
    assert heldout == data.heldout_prompts(200, seed=0)
    assert heldout != train
    assert len(set(heldout)) > 150  # varied, not one repeated prompt


def test_sessions_evolve_by_exactly_one_recorded_change_per_round():
    sessions = data.make_session_steps(40, rounds=6, seed=1)
    assert data.make_sessions(40, rounds=6, seed=1) == [[s.prompt for s in steps] for steps in sessions]
    seen_changes = set()
    for steps in sessions:
        assert len(steps) == 6
        assert steps[0].change is None
        for before, after in itertools.pairwise(steps):
            assert after.prompt != before.prompt
            assert data.diff_scenes(data.parse_caption(before.prompt), data.parse_caption(after.prompt)) == [
                after.change
            ]
            assert not after.scene.problems()
            seen_changes.add(after.change)
    assert {"colour", "add", "move", "background"} <= seen_changes


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match="colour='teal'"):
        data.Shape("circle", "teal", "large", "left")
    with pytest.raises(ValueError, match="rounds=0"):
        data.make_sessions(1, rounds=0)
