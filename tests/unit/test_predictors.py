"""Learned strength predictors: the shipped ones load and answer on their grids; label, train and eval run
end to end on a handful of tiny-random sessions; the edit workflow uses the edit predictor's strength."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import numpy as np
import pytest
from PIL import Image

from diffusionx.experiments.predictor import evaluate, label, train
from diffusionx.experiments.predictor.targets import EDIT_GRID, REFINE_GRID, edit_ok, smallest
from diffusionx.policy.features import (
    ALIGNMENT_FEATURES,
    TextEmbedder,
    alignment_features,
    build_features,
    feature_dim,
    word_change,
)
from diffusionx.policy.learned import (
    LearnedStrengthPredictor,
    PredictorConfig,
    StrengthNet,
    load_predictor,
    shipped_predictors,
    strength_function,
)
from diffusionx.policy.strength import predict_strength
from diffusionx.shapes.data import Scene, Shape, render

PROMPT = "a large red circle on the left, blue background"
EDITED = "a large red circle on the right, blue background"


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return render(Scene((Shape("circle", "red", "large", "left"),), "blue"))


def test_shipped_predictors_were_trained_with_predictor_trains_defaults():
    # docs/models.md: `predictor train` with its defaults reproduces the shipped predictors' settings
    for name in ("shapes-refine", "shapes-edit"):
        config = load_predictor(name).config
        assert config.hidden == train.DEFAULT_HIDDEN
        assert config.trained["epochs"] == train.DEFAULT_EPOCHS
    refine = load_predictor("shapes-refine").config
    assert (refine.floor, refine.risk_scale) == (train.DEFAULT_RISK_FLOOR, train.DEFAULT_RISK_SCALE)


def test_shipped_predictors_load_by_name_and_pick_grid_strengths(picture):
    assert {"shapes-refine", "shapes-edit"} <= set(shipped_predictors())
    refine = load_predictor("shapes-refine")
    edit = load_predictor("shapes-edit", embedder=refine.embedder)
    assert refine.config.kind == "refine" and edit.config.kind == "edit"
    assert refine.config.grid == list(REFINE_GRID) and edit.config.grid == list(EDIT_GRID)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for image in (picture, noise):
        assert refine(PROMPT, image) in REFINE_GRID
        assert edit(EDITED, image, PROMPT) in EDIT_GRID
    # a batch gives what single calls give
    assert refine.predict([PROMPT, PROMPT], [picture, noise]) == [
        refine(PROMPT, picture),
        refine(PROMPT, noise),
    ]
    # what it was trained on is recorded with the weights
    assert refine.config.trained["sessions"] >= 100 and refine.config.decision == "risk"
    assert refine.config.risk_scale >= refine.min_risk_scale - 1e-4 and 0 < edit.config.threshold < 1
    assert refine.config.floor == train.DEFAULT_RISK_FLOOR and edit.config.floor is None


def _predictor(decision: str, **settings: float) -> LearnedStrengthPredictor:
    config = PredictorConfig(
        "refine", list(REFINE_GRID), "tiny-random", 4, decision=decision, wrong_from=0.3, **settings
    )
    return LearnedStrengthPredictor(config, StrengthNet(config), embedder=None)  # type: ignore[arg-type]


def _probabilities(risks: list[float]) -> np.ndarray:
    """Monotone P(label <= s_k): a right preview's label 0.05, a wrong one's 0.3, in these shares."""
    grid = np.array(REFINE_GRID)
    return np.array([np.where(grid < 0.3 - 1e-9, 1.0 - r, 1.0) for r in risks])


def test_the_risk_decision_rises_with_the_risk_that_the_preview_is_wrong():
    risks = [0.0, 0.01, 0.04, 0.1, 0.2, 0.4, 0.7, 1.0]
    probs = _probabilities(risks)
    risk = _predictor("risk", risk_scale=0.6)
    assert risk.risk(probs) == pytest.approx(risks)
    chosen = risk.choose(probs)
    assert chosen == sorted(chosen) and chosen[0] == REFINE_GRID[0] and chosen[-1] == 0.7  # 0.05 + 0.6
    assert len(set(chosen)) >= 6  # graded: the small risks spread over the one-call steps
    assert all(s in REFINE_GRID for s in chosen) and risk.choose(probs, 0.0) == [0.05] * len(risks)
    # the least scale train may choose refines a preview as likely wrong as right at wrong_from
    assert risk.choose(_probabilities([0.5]), risk.min_risk_scale) == [0.3]
    assert risk.choose(_probabilities([0.3]), risk.min_risk_scale) == [0.25]
    # the quantile decision on the same probabilities: two strengths, one jump at 1 - threshold
    quantile = _predictor("quantile", threshold=0.85).choose(probs)
    assert sorted(set(quantile)) == [0.05, 0.3]
    with pytest.raises(ValueError, match="wrong_from"):
        PredictorConfig("refine", list(REFINE_GRID), "tiny-random", 4, decision="risk")


def test_the_risk_decisions_floor_gives_a_preview_the_strength_its_predicted_label_median_needs():
    grid = np.array(REFINE_GRID)
    # a far-wrong preview: certainly wrong, and enough only from 0.7 on with probability 0.6
    far = np.where(grid < 0.3 - 1e-9, 0.0, np.where(grid < 0.7 - 1e-9, 0.3, 1.0))[None, :]
    far[0, grid >= 0.7 - 1e-9] = 0.6
    near = _probabilities([0.1])  # likely right: its median label is the lightest strength
    unfloored = _predictor("risk", risk_scale=0.3536)
    floored = _predictor("risk", risk_scale=0.3536, floor=0.5)
    assert unfloored.choose(far) == [0.5]  # the rising strength stops at the first past 0.05 + 0.3536
    assert floored.choose(far) == [0.7]  # the smallest strength enough with probability >= 0.5
    assert floored.choose(near) == unfloored.choose(near)  # the floor never lowers the rising strength
    assert floored.choose(np.zeros((1, len(grid)))) == [REFINE_GRID[-1]]  # nothing enough: the strongest
    with pytest.raises(ValueError, match="floor"):
        PredictorConfig("refine", list(REFINE_GRID), "tiny-random", 4, decision="quantile", floor=0.5)
    with pytest.raises(ValueError, match="floor"):
        _predictor("risk", floor=1.5)
    # a floor above 1/2 refines a preview of risk 1/2 or more at wrong_from by itself, so the least
    # scale need only take a certainly wrong one there
    above = _predictor("risk", risk_scale=0.3536, floor=0.7)
    assert unfloored.min_risk_scale == floored.min_risk_scale == pytest.approx(0.25 / np.sqrt(0.5))
    assert above.min_risk_scale == pytest.approx(0.25)
    assert above.choose(_probabilities([0.5]), above.min_risk_scale) == [0.3]  # the floor's doing
    assert above.choose(_probabilities([1.0]), above.min_risk_scale) == [0.3]
    with pytest.raises(ValueError, match="not one of"):
        PredictorConfig("refine", list(REFINE_GRID), "tiny-random", 4, decision="mean")


def test_predictor_names_select_heuristic_or_learned_and_a_missing_one_is_a_clear_error():
    assert strength_function("heuristic") is predict_strength
    assert strength_function("shapes-refine").config.kind == "refine"
    with pytest.raises(FileNotFoundError, match=r"shipped: .*shapes-edit"):
        load_predictor("no-such-predictor")


def test_features_see_the_image_the_prompt_and_what_changed(picture):
    embedder = TextEmbedder.load("shapes-cloud")
    features = build_features(embedder, [PROMPT, EDITED], [picture, picture], [None, PROMPT])
    assert features.shape == (2, feature_dim(embedder.dim))
    change = features[:, -(embedder.dim + 1) :]
    assert np.all(change[0] == 0)  # no history: nothing changed
    assert np.abs(change[1, :-1]).sum() > 0 and change[1, -1] == pytest.approx(word_change(PROMPT, EDITED))
    assert word_change(PROMPT, EDITED) == pytest.approx(2 / 18)  # "left" -> "right" of 9 + 9 words


def test_the_alignment_feature_set_is_the_residual_noise_and_what_the_clip_sees(picture):
    from diffusionx.models.alignment import load_alignment_model
    from diffusionx.policy.strength import residual_noise

    embedder = TextEmbedder.load("tiny-random")
    clip = load_alignment_model("tiny-random-clip", device="cpu")
    features = build_features(embedder, [PROMPT, EDITED], [picture, picture], None, clip, "alignment")
    assert features.shape == (2, feature_dim(embedder.dim, True, "alignment")) == (2, 1 + ALIGNMENT_FEATURES)
    assert features[:, 0] == pytest.approx([residual_noise(picture)] * 2)
    assert np.allclose(features[:, 1:], alignment_features(clip, [PROMPT, EDITED], [picture, picture]))
    full = build_features(embedder, [PROMPT], [picture], None, clip)
    assert np.allclose(full[0, -ALIGNMENT_FEATURES:], features[0, 1:])  # the same CLIP features
    with pytest.raises(ValueError, match="needs an alignment model"):
        build_features(embedder, [PROMPT], [picture], None, None, "alignment")
    with pytest.raises(ValueError, match=r"not one of \['full', 'alignment'\]"):
        build_features(embedder, [PROMPT], [picture], None, clip, "pixels")


def test_targets_define_edit_ok_and_the_smallest_good_strength():
    previous = {"kind": 1.0, "colour": 1.0, "size": 0.0, "position": 1.0, "background": 1.0}
    moved = {**previous, "position": 1.0}
    assert edit_ok(moved, previous, "move")
    assert not edit_ok({**moved, "position": 0.0}, previous, "move")  # the change did not happen
    assert not edit_ok({**moved, "kind": 0.0}, previous, "move")  # an unchanged attribute broke
    assert edit_ok({**moved, "size": 0.0}, previous, "move")  # was wrong before: may stay wrong
    assert smallest((0.25, 0.5, 1.0), [False, True, True]) == (0.5, True)
    assert smallest((0.25, 0.5, 1.0), [False, False, False]) == (1.0, False)


def test_label_train_eval_end_to_end_on_tiny_random_sessions(tmp_path, capsys):
    models = ["--cloud", "tiny-random", "--edge", "tiny-random-edge", "--no-progress"]
    data = tmp_path / "labels.jsonl"
    assert label.main(["--sessions", "3", "--rounds", "2", "--out", str(data), *models]) == 0
    records = label.read_records(data)
    assert [r["session"] for r in records] == [0, 1, 2]
    first = records[0]
    assert first["refine"]["label"] in REFINE_GRID and len(first["edits"]) == 1
    assert [t["strength"] for t in first["edits"][0]["trials"]] == list(EDIT_GRID)
    assert first["settings"]["carry"] == "predicted" and first["edits"][0]["carried"] in EDIT_GRID
    trials = first["refine"]["trials"]
    assert [t["strength"] for t in trials] == list(REFINE_GRID[: len(trials)])  # ascending until reached
    assert all(t["cloud_calls"] == int(4 * t["strength"]) for t in trials)  # tiny-random: N = 4
    # resumable: a rerun with more sessions labels only the new one
    assert label.main(["--sessions", "4", "--rounds", "2", "--out", str(data), *models]) == 0
    assert [r["session"] for r in label.read_records(data)] == [0, 1, 2, 3]
    with pytest.raises(SystemExit):
        label.main(["--sessions", "4", "--rounds", "3", "--out", str(data), *models])
    assert "labels made with" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # labels carried another way are not mixed into the same file
        label.main(
            ["--sessions", "4", "--rounds", "2", "--carry", "smallest-ok", "--out", str(data), *models]
        )
    assert "labels made with" in capsys.readouterr().err

    weights = tmp_path / "weights"
    options = [
        "--out-dir",
        str(weights),
        "--prefix",
        "t",
        "--epochs",
        "5",
        "--alignment-model",
        "tiny-random-clip",
    ]
    assert train.main(["--data", str(data), *options, "--refine-features", "alignment"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["sessions"] == 4 and trained["refine"]["decision"] == "risk"
    assert trained["refine"]["floor"] == train.DEFAULT_RISK_FLOOR and "floor" not in trained["edit"]
    assert trained["refine"]["setting"] == train.DEFAULT_RISK_SCALE
    assert trained["edit"]["decision"] == "quantile" and trained["edit"]["setting"] in train.THRESHOLDS
    refine = load_predictor(str(weights / "t-refine.safetensors"))
    assert refine.config.text_model == "tiny-random" and refine.config.trained["examples"] == 4
    assert refine.config.alignment_model == "tiny-random-clip" and refine.alignment is not None
    # the refine predictor reads the feature set it was trained on, the edit predictor the default (full)
    assert refine.config.features == "alignment" and refine.config.input_dim == 1 + ALIGNMENT_FEATURES
    edit = load_predictor(str(weights / "t-edit.safetensors"))
    assert edit.config.features == "full"
    assert edit.config.input_dim == feature_dim(edit.embedder.dim, alignment=True)
    assert refine.config.wrong_from == train.WRONG_PREVIEW_MIN_STRENGTH
    assert train.main(["--data", str(data), *options[:-1], "none", "--refine-features", "alignment"]) == 2
    assert "need an alignment model" in capsys.readouterr().err
    assert train.main(["--data", str(data), *options, "--wrong-preview-min-strength", "0"]) == 2
    assert "use --refine-decision quantile" in capsys.readouterr().err
    # the risk scale: chosen on validation from the least the floor allows, or refused below it
    assert train.main(["--data", str(data), *options, "--risk-scale", "auto"]) == 0
    chosen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["refine"]["setting"]
    assert chosen in (0.25, *(s for s in train.RISK_SCALES if s > 0.25))  # wrong_from 0.3 - 0.05
    assert train.main(["--data", str(data), *options, "--risk-scale", "0.2"]) == 2
    assert "below 0.2500" in capsys.readouterr().err
    assert train.main(["--data", str(data), *options, "--risk-scale", "some"]) == 2
    assert "use a scale in (0, 1] or 'auto'" in capsys.readouterr().err

    plot = tmp_path / "pareto.png"
    args = [
        "--sessions",
        "2",
        "--json",
        "--plot",
        str(plot),
        "--session-seed",
        "0",
        "--image-seed",
        "7",
        *models,
    ]
    args += ["--refine-predictor", str(weights / "t-refine.safetensors")]
    args += ["--edit-predictor", str(weights / "t-edit.safetensors")]
    assert evaluate.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["methods"]) == {
        "learned",
        "heuristic",
        "fixed-0.3",
        "fixed-0.5",
        "fixed-0.7",
        "fixed-1.0",
    }
    for values in report["methods"].values():
        assert set(values) == {"quality", "cloud_unet_calls"}
    assert report["methods"]["fixed-0.5"]["cloud_unet_calls"] == 2.0  # int(4 * 0.5)
    assert report["methods"]["fixed-1.0"]["cloud_unet_calls"] == 4.0
    assert report["target"] == pytest.approx(report["reference"]["quality"] - 0.01)
    assert set(report["edit"]["methods"]) == set(report["methods"])
    assert report["timing"]["refine_predict_cpu_ms"] > 0
    assert (report["session_seed"], report["image_seed"]) == (0, 7)
    assert set(report["wrong_preview_auc_by_method"]) == {"learned", "heuristic"}
    assert "wrong_preview_auc" in report and 0 <= report["wrong_previews"] <= 2
    assert plot.exists() and Image.open(plot).size[0] > 500


def test_edit_without_strength_uses_the_edit_predictor(picture):
    from diffusionx.models.loading import load_model
    from diffusionx.workflows import modes
    from diffusionx.workflows.local import local_tiers

    edge = load_model("tiny-random-edge")
    asked = []

    def predict_edit(prompt: str, image: Image.Image, previous_prompt: str | None) -> float:
        asked.append((prompt, previous_prompt))
        return 0.75

    tiers = local_tiers(None, edge, predict_edit=predict_edit)
    result = asyncio.run(modes.edit_predicted(tiers, EDITED, picture, PROMPT, seed=3))
    assert asked == [(EDITED, PROMPT)]
    assert result.strength == 0.75 and result.unet_calls.edge == int(4 * 0.75)
    # the shipped edit predictor through the same workflow: its strength is one of its grid's
    tiers = local_tiers(None, edge, predict_edit=load_predictor("shapes-edit"))
    result = asyncio.run(modes.edit_predicted(tiers, EDITED, picture, PROMPT, seed=3))
    assert result.strength in EDIT_GRID and "predict" in result.timings_ms


def test_an_edge_tier_with_the_edit_predictor_predicts_and_edits_in_one_call(picture):
    """`edit_predictor_on: edge`: the edge tier picks the strength itself (the predictor tier is not asked)
    and edits to the same pixels as the predictor tier's strength would."""
    from diffusionx.models.loading import load_model
    from diffusionx.requests import EditRequest, InvalidRequestError
    from diffusionx.workflows import modes
    from diffusionx.workflows.local import local_tiers

    edge = load_model("tiny-random-edge")
    predicted = load_predictor("shapes-edit")
    on_edge = local_tiers(None, edge, predict_edit=predicted, edit_predictor_on="edge")
    on_predictor = local_tiers(None, edge, predict_edit=predicted)

    async def refuse(*_: object) -> float:
        raise AssertionError("the predictor tier was asked for an edit's strength")

    on_edge.predictor.predict_edit = refuse  # type: ignore[method-assign]
    assert asyncio.run(on_edge.info("edge"))["edit_predictor"] == predicted.name
    assert "edit_predictor" not in asyncio.run(on_predictor.info("edge"))
    one = asyncio.run(modes.edit_predicted(on_edge, EDITED, picture, PROMPT, seed=3))
    two = asyncio.run(modes.edit_predicted(on_predictor, EDITED, picture, PROMPT, seed=3))
    assert one.strength == two.strength == predicted(EDITED, picture, PROMPT)
    assert np.array_equal(np.asarray(one.image), np.asarray(two.image))
    assert next(iter(one.timings_ms)) == "predict" and one.unet_calls == two.unet_calls
    # an edge tier without the predictor says what to do; a bad edit fails before any prediction
    with pytest.raises(ValueError, match="no edit predictor"):
        asyncio.run(on_predictor.edge.edit_predicted(EditRequest(EDITED, picture, PROMPT)))
    with pytest.raises(InvalidRequestError, match="prompt"):
        EditRequest("", picture, PROMPT)


def test_an_edge_tiers_predictions_and_model_calls_take_turns(picture):
    """In one process a prediction beside a running preview would share the GIL with it: the edge tier's
    edit predictions and its model's batches never run at the same time, and both still answer."""
    from diffusionx.engine.tiers import EdgeModel
    from diffusionx.models.loading import load_model
    from diffusionx.requests import EditRequest, PreviewRequest

    running, most = 0, 0

    async def counting(function, *args):
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            return await asyncio.to_thread(function, *args)
        finally:
            running -= 1

    def slow_predict(prompt: str, image: Image.Image, previous_prompt: str | None) -> float:
        time.sleep(0.05)  # long enough to overlap the preview if nothing kept them apart
        return 0.5

    edge = EdgeModel(load_model("tiny-random-edge"), 4, predict_edit=slow_predict, run_blocking=counting)

    async def both():
        return await asyncio.gather(
            edge.preview(PreviewRequest(PROMPT, seed=1)),
            edge.edit_predicted(EditRequest(EDITED, picture, PROMPT)),
            edge.edit_predicted(EditRequest(PROMPT, picture, EDITED)),
        )

    preview, edited, again = asyncio.run(both())
    assert most == 1 and edited.strength == again.strength == 0.5 and preview.image.size == edited.image.size
    assert len(asyncio.run(both())) == 3 and most == 1  # the same tier under another event loop
    # a GPU-timed stand-in waits a GPU's time instead of computing: its calls overlap as on a GPU
    timed = dataclasses.replace(edge.model, spec=dataclasses.replace(edge.model.spec, gpu_timed="edge"))
    most = 0
    edge = EdgeModel(timed, 4, predict_edit=slow_predict, run_blocking=counting)
    asyncio.run(both())
    assert most == 2


def test_the_carried_edit_is_the_predictors_pick_on_the_grid_else_the_label():
    assert label._carried(0.5, None) == 0.5  # --carry smallest-ok
    assert label._carried(0.5, 1.0) == 1.0 and label._carried(0.25, 0.7) == 0.75
