from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from diffusionx.experiments import evaluation
from diffusionx.models.registry import EMBEDDED_SHAPES_DIR
from diffusionx.sampling.collaborative import CollaborationParams, expected_unet_calls

# tiny-random reads at most 16 tokens, so it gets short prompts instead of shapes captions
PROMPTS = ["a red circle", "a blue square", "a green triangle"]
ACCURACY = {"a red circle": 0.2, "a blue square": 0.5, "a green triangle": 0.8}
TINY = ["--cloud", "tiny-random", "--edge", "tiny-random-edge", "--no-progress"]


@pytest.fixture
def fake_judge(monkeypatch):
    """Held-out prompts and judge replaced by fakes whose mean is known."""
    seen: list[tuple[tuple[int, int], str]] = []

    def score(image: Image.Image, caption: str) -> dict[str, float]:
        seen.append((image.size, caption))
        value = ACCURACY[caption]
        return {
            "kind": value,
            "colour": 1.0,
            "size": 0.0,
            "position": value,
            "background": 1.0,
            "accuracy": value,
            "exact": float(value > 0.6),
        }

    monkeypatch.setattr(evaluation, "heldout_prompts", lambda n, seed=0: PROMPTS[:n])
    monkeypatch.setattr(evaluation, "score", score)
    return seen


def test_eval_json_reports_quality_and_cost(fake_judge, capsys):
    argv = ["--mode", "ec-diff", "--n", "3", "--json", "--steps", "8", "--batch-size", "2", *TINY]
    assert evaluation.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    keys = {"mode", "n", "quality", "exact", "per_attribute", "unet_calls", "seconds_per_image"}
    assert keys <= set(report)
    assert report["mode"] == "ec-diff" and report["n"] == 3
    assert report["quality"] == pytest.approx(0.5)
    assert report["exact"] == pytest.approx(1 / 3)  # only "a green triangle" is all right
    assert report["per_attribute"] == pytest.approx(
        {"kind": 0.5, "colour": 1.0, "size": 0.0, "position": 0.5, "background": 1.0}
    )
    expected = expected_unet_calls(CollaborationParams.ec_diff(8)).to_dict()
    assert report["unet_calls"] == pytest.approx({tier: float(n) for tier, n in expected.items()})
    assert report["seconds_per_image"] > 0
    # the CLIP score column: tiny-random models are read by the tiny random CLIP (a CLIPScore in [0, 100])
    assert report["settings"]["alignment_model"] == "tiny-random-clip" and 0 <= report["clip_score"] <= 100
    assert [caption for _, caption in fake_judge] == PROMPTS
    assert {size for size, _ in fake_judge} == {(32, 32)}


def test_eval_table_for_diffusionx_with_strength(fake_judge, capsys):
    assert evaluation.main(["--mode", "diffusionx", "--n", "2", "--strength", "0.5", *TINY]) == 0
    table = capsys.readouterr().out
    assert "quality (judge accuracy)" in table and "0.3500" in table
    assert re.search(r"unet calls / image: cloud\s+2\.00\n", table)  # 0.5 x 4 default steps
    assert re.search(r"unet calls / image: edge\s+2\.00\n", table)  # 2 preview steps


def test_eval_refuses_a_parameter_the_mode_does_not_use(fake_judge, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--mode", "cloud", "--n", "1", "--strength", "0.5", *TINY])
    assert exit_info.value.code == 2
    assert "strength does not apply to mode 'cloud'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    not (EMBEDDED_SHAPES_DIR / "model_index.json").exists(), reason="the embedded shapes models are not built"
)
def test_ec_diff_quality_between_edge_and_cloud_on_shapes(capsys):
    """On the embedded shapes models, EC-Diff costs fewer cloud calls than cloud-only and judges at least as
    well as the edge model."""
    reports = {}
    for mode in ("cloud", "edge", "ec-diff"):
        evaluation.main(["--mode", mode, "--n", "48", "--json", "--no-progress"])
        reports[mode] = json.loads(capsys.readouterr().out)
    assert reports["ec-diff"]["unet_calls"]["cloud"] < reports["cloud"]["unet_calls"]["cloud"]
    assert reports["ec-diff"]["quality"] >= reports["edge"]["quality"] - 0.02


def test_eval_names_a_missing_model(tmp_path, capsys):
    assert evaluation.main(["--mode", "cloud", "--n", "1", "--cloud", str(tmp_path / "nowhere")]) == 1
    assert "is not available" in capsys.readouterr().err
