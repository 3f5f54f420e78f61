from __future__ import annotations

import json

from diffusionx.experiments.compare import main, mode_fields


def test_mode_fields_use_the_searched_parameters():
    params = {
        "num_inference_steps": 20,
        "switch_step": 15,
        "warmup_steps": 3,
        "approx_interval": 2,
        "smoothing": 0.3,
    }
    fields = mode_fields(params, steps=None)
    assert fields["ec-diff"] == {
        "num_inference_steps": 20,
        "switch_step": 15,
        "warmup_steps": 3,
        "approx_interval": 2,
        "smoothing": 0.3,
    }
    assert fields["hybrid"] == {"num_inference_steps": 20, "switch_step": 15}
    assert mode_fields(None, steps=12)["cloud"] == {"num_inference_steps": 12}


def test_compare_writes_one_row_per_mode_on_the_same_prompts(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text(
        json.dumps(
            {
                "num_inference_steps": 10,
                "switch_step": 6,
                "warmup_steps": 2,
                "approx_interval": 1,
                "smoothing": 0.3,
            }
        )
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "--cloud",
                "tiny-random",
                "--edge",
                "tiny-random-edge",
                "--n",
                "2",
                "--params",
                str(params),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = {r["mode"]: r for r in json.loads((out / "modes.json").read_text())["rows"]}
    assert list(rows) == ["cloud", "edge", "hybrid", "ec-diff", "diffusionx"]
    assert rows["cloud"]["cloud_calls"] == 10 and rows["cloud"]["edge_calls"] == 0
    assert (rows["hybrid"]["cloud_calls"], rows["hybrid"]["edge_calls"]) == (6, 4)
    # p=2, k=1 before s=6: cloud at steps 0, 1, 3, 5; steps 2 and 4 extrapolated
    assert (
        rows["ec-diff"]["cloud_calls"],
        rows["ec-diff"]["approximated"],
        rows["ec-diff"]["edge_calls"],
    ) == (4, 2, 4)
    assert rows["diffusionx"]["cloud_calls"] > 0 and rows["diffusionx"]["edge_calls"] > 0
    assert "| ec-diff | 4.0 |" in (out / "modes.md").read_text()
    assert (out / "modes.csv").read_text().startswith("mode,cloud_calls")
