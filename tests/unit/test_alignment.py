"""The image-text alignment model (CLIP) and the predictor features read from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionx.experiments.predictor.evaluate import roc_auc
from diffusionx.models.alignment import SHAPES_CLIP_DIR, get_alignment_spec, load_alignment_model
from diffusionx.models.loading import ModelNotAvailableError
from diffusionx.policy.features import ALIGNMENT_FEATURES, alignment_features
from diffusionx.shapes import data
from diffusionx.shapes.perturb import ATTRIBUTES, perturbations
from diffusionx.shapes.train_clip import (
    _array,
    attribute_accuracy,
    card_commands,
    contrastive_loss,
    init_model,
    main,
    new_model,
    pick_output,
    seen_caption,
    to_pixel_values,
    write_card,
)

PAIR = "a large red circle on the left and a small blue square on the right, white background"


@pytest.fixture(scope="module")
def tiny_clip():
    return load_alignment_model("tiny-random-clip", device="cpu")


def test_tiny_random_clip_loads_through_from_pretrained_and_scores_images_against_texts(tiny_clip):
    assert (get_alignment_spec("tiny-random-clip").source + "/config.json").endswith("config.json")
    images = [Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (48, 48), (30, 70, 230))]
    similarity = tiny_clip.similarity(images, ["a red circle", "a blue square", "a red circle"])
    assert similarity.shape == (2, 3) and np.all(np.abs(similarity) <= 1.0 + 1e-5)
    assert similarity[:, 0] == pytest.approx(similarity[:, 2])  # same text, same (cached) embedding


def test_a_missing_alignment_checkpoint_is_the_registrys_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError) as error:
        load_alignment_model(str(tmp_path / "clip-vit-large-patch14"))
    message = str(error.value)
    assert (
        "no config.json there" in message and "shapes-clip" in message and "clip-vit-large-patch14" in message
    )


def test_each_perturbation_changes_exactly_one_attribute_and_stays_well_formed():
    options = perturbations(PAIR)
    scene = data.parse_caption(PAIR)
    changed_names = {"kind": {"kind"}, "colour": {"colour"}, "size": {"size"}, "position": {"move"}}
    for attribute in ATTRIBUTES:
        assert options[attribute], attribute
        for text in options[attribute]:
            other = data.parse_caption(text)
            assert not other.problems() and text != PAIR
            changes = set(data.diff_scenes(scene, other))
            assert changes == changed_names.get(attribute, {"background"}), (attribute, text)
    swapped = "a large red circle on the right and a small blue square on the left, white background"
    assert swapped in options["position"]
    # outside the grammar, attribute words are found by class; the background colour is its own attribute
    free = perturbations("a photo of a small red car, blue background")
    assert "a photo of a large red car, blue background" in free["size"]
    assert "a photo of a small green car, blue background" in free["colour"]
    assert "a photo of a small red car, green background" in free["background"]
    assert all("blue background" in t for t in free["colour"])


def test_alignment_features_are_similarity_and_margins_against_perturbations(tiny_clip):
    image = data.render(data.parse_caption(PAIR))
    features = alignment_features(tiny_clip, [PAIR, PAIR], [image, image])
    assert features.shape == (2, ALIGNMENT_FEATURES) and np.allclose(features[0], features[1])
    options = perturbations(PAIR)
    scores = tiny_clip.similarity([image], [PAIR, *options["colour"]])[0]
    assert features[0, 0] == pytest.approx(scores[0], abs=1e-5)
    assert features[0, 1 + ATTRIBUTES.index("colour")] == pytest.approx(
        scores[0] - scores[1:].max(), abs=1e-5
    )
    assert features[0, -1] == pytest.approx(features[0, 1:-1].min())


def test_training_batches_prepare_images_exactly_as_the_shipped_processor(tiny_clip):
    image = data.render(data.parse_caption(PAIR))
    assert torch.equal(to_pixel_values(_array(image)[None]), tiny_clip.pixel_values([image]))


def test_contrastive_training_separates_a_caption_from_its_perturbations(tiny_clip):
    """A few steps on one batch raise the attribute accuracy measured against every perturbation."""
    model = type(tiny_clip.model)(tiny_clip.model.config)
    model.load_state_dict(tiny_clip.model.state_dict())
    model.requires_grad_(True).train()
    scenes = data.training_scenes(4, seed=3, two_shape_probability=0.0)
    captions = [data.caption(s) for s in scenes]
    pixels = to_pixel_values(np.stack([_array(data.render(s)) for s in scenes]))
    negatives = [[t for a in ATTRIBUTES for t in perturbations(c)[a]] for c in captions]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = attribute_accuracy(model, tiny_clip.tokenizer, pixels, captions)
    first = contrastive_loss(model, pixels, captions, negatives, tiny_clip.tokenizer).item()
    for _ in range(60):
        loss = contrastive_loss(model, pixels, captions, negatives, tiny_clip.tokenizer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    after = attribute_accuracy(model, tiny_clip.tokenizer, pixels, captions)
    mean = lambda accuracy: float(np.mean([accuracy[a] for a in ATTRIBUTES]))  # noqa: E731
    assert mean(after) >= mean(before) + 0.15, (before, after)


def test_the_judge_captions_what_a_model_output_shows():
    scene = data.parse_caption(PAIR)
    image = data.render(scene)
    assert seen_caption(image, PAIR) == PAIR
    wrong = "a large green circle on the left and a small blue square on the right, white background"
    seen = data.parse_caption(
        seen_caption(image, wrong) or ""
    )  # what it shows, not the prompt it was made for
    assert set(seen.shapes) == set(scene.shapes) and seen.background == scene.background
    assert seen_caption(Image.new("RGB", (32, 32), (245, 245, 245)), PAIR) is None  # no shape to read


def test_roc_auc_counts_ties_as_half():
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.5, 0.5, 0.5], [1, 0, 0]) == 0.5
    assert roc_auc([0.1, 0.9], [1, 0]) == 0.0
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_shipped_shapes_clip_tells_a_caption_from_its_perturbations():
    """The shipped alignment model, on held-out clean renders it never saw."""
    model = load_alignment_model("shapes-clip", device="cpu")
    scenes = data.heldout_scenes(64, seed=5)
    pixels = to_pixel_values(np.stack([_array(data.render(s)) for s in scenes]))
    accuracy = attribute_accuracy(model.model, model.tokenizer, pixels, [data.caption(s) for s in scenes])
    assert accuracy["all"] >= 0.95, accuracy


def test_train_clip_init_continues_from_the_shipped_model_and_its_card(tmp_path):
    """`train-clip --init`: the starting model is the exported one, weight for weight, and the new card
    lists the commands that trained it; a directory without a CLIPModel is a clear error."""
    shipped = load_alignment_model("shapes-clip", device="cpu")
    model, tokenizer = init_model(str(SHAPES_CLIP_DIR))
    for key, value in shipped.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert tokenizer("a red circle").input_ids == shipped.tokenizer("a red circle").input_ids
    commands = card_commands(SHAPES_CLIP_DIR)
    assert commands and all(c.startswith("diffusionx train-clip ") for c in commands)
    assert card_commands(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no CLIPModel there"):
        init_model(str(tmp_path))


def test_train_clip_builds_the_asked_patch_size_and_its_card_says_it(tmp_path, capsys):
    """`--patch-size 2`: a vision tower of 16x16 patches (and their position table), the card names them;
    a size that does not divide the 32-pixel images is refused."""
    model, _ = new_model(0, patch_size=2)
    embeddings = model.vision_model.embeddings
    assert tuple(embeddings.patch_embedding.weight.shape[-2:]) == (2, 2)
    assert embeddings.position_embedding.weight.shape[0] == 1 + 16 * 16
    pixels = to_pixel_values(np.stack([_array(data.render(data.heldout_scenes(1, seed=0)[0]))]))
    assert model.vision_model(pixel_values=pixels).last_hidden_state.shape[1] == 1 + 16 * 16  # + class
    row = {
        "step": 1,
        "minutes": 0.1,
        "n_clean": 1,
        "n_previews": 1,
        "n_all_previews": 1,
        "previews_wrong_auc": 0.5,
        "clean": dict.fromkeys([*ATTRIBUTES, "all"], 1.0),
        "previews": dict.fromkeys([*ATTRIBUTES, "all"], 1.0),
    }
    write_card(
        tmp_path, row, {"commands": [(0, "diffusionx train-clip --patch-size 2")], "sessions": 1}, model
    )
    assert "32x32 images in 2x2 patches" in (tmp_path / "README.md").read_text()
    with pytest.raises(SystemExit):
        main(["--patch-size", "3"])
    assert "--patch-size: invalid choice: 3" in capsys.readouterr().err


def test_train_clip_draws_the_asked_share_of_wrong_outputs_and_refuses_shares_outside_0_1(capsys):
    import random

    rng, wrong = random.Random(0), [3, 7]
    drawn = [pick_output(rng, 100, wrong, 0.5) for _ in range(4000)]
    assert 0.47 < sum(i in wrong for i in drawn) / len(drawn) < 0.53
    drawn = [pick_output(rng, 100, wrong, None) for _ in range(4000)]
    assert sum(i in wrong for i in drawn) / len(drawn) < 0.04  # uniform: 2 in 100
    for option in ("--output-share", "--wrong-share"):
        with pytest.raises(SystemExit):
            main([option, "1.5"])
        assert f"{option}=1.5 is not allowed: use a share in [0, 1]" in capsys.readouterr().err
