from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffusionx.experiments import search
from diffusionx.experiments.search import LOG_COLUMNS, Measurement, switch_candidates, two_stage_search
from diffusionx.sampling.collaborative import CollaborationParams, expected_unet_calls


def cloud_share_quality(params: CollaborationParams) -> Measurement:
    """A fake quality that falls with fewer cloud calls (and so must be respected by the search)."""
    calls = expected_unet_calls(params)
    return Measurement(quality=calls.cloud / params.num_inference_steps, seconds=0.01)


def assert_chosen_is_minimal_feasible(result: search.SearchResult) -> None:
    feasible = [point for point in result.log if point.feasible]
    assert result.chosen.feasible and result.chosen.quality >= result.threshold
    assert result.chosen.cloud_calls == min(point.cloud_calls for point in feasible)
    for point in result.log:
        assert point.feasible == (point.quality >= result.threshold)


def test_switch_candidates_are_the_next_cloud_calls():
    params = CollaborationParams(20, switch_step=15, warmup_steps=3, approx_interval=2, smoothing=0.3)
    # cloud at 0, 1, 2, then (i - 2) % 3 == 0: 5, 8, 11, 14, 17
    assert switch_candidates(params) == [5, 8, 11, 14, 17, 20]
    hybrid = CollaborationParams.hybrid(6, switch_step=4)
    assert switch_candidates(hybrid) == [0, 1, 2, 3, 4, 5, 6]


def test_search_respects_the_quality_target():
    measured: list[CollaborationParams] = []

    def measure(params: CollaborationParams) -> Measurement:
        measured.append(params)
        return cloud_share_quality(params)

    result = two_stage_search(measure, 20, target=0.5, progress=False)
    assert result.baseline_quality == 1.0 and result.threshold == 0.5
    assert_chosen_is_minimal_feasible(result)
    assert result.chosen.cloud_calls == 10  # the least the target allows: quality = calls / 20 >= 0.5
    assert [p.stage for p in result.log][:2] == ["baseline", "stage1"]
    assert {"stage1", "stage2"} <= {p.stage for p in result.log}
    assert result.log[0].params.switch_step == 20 and result.log[0].params.warmup_steps is None
    # greedy: far fewer runs than the grid p x k x a x s, and points computing the same images run once
    assert len(measured) < 40
    assert len(measured) <= len(result.log)
    stage1 = [p for p in result.log if p.stage == "stage1"]
    assert {p.params.switch_step for p in stage1} == {15}
    stage2 = [p for p in result.log if p.stage == "stage2"]
    best = result.chosen.params
    assert {(p.params.warmup_steps, p.params.approx_interval, p.params.smoothing) for p in stage2} == {
        (best.warmup_steps, best.approx_interval, best.smoothing)
    }


def test_search_tries_other_smoothing_when_the_first_misses():
    def measure(params: CollaborationParams) -> Measurement:
        calls = expected_unet_calls(params)
        penalty = 0.3 if calls.approximated and params.smoothing != 0.6 else 0.0
        return Measurement(quality=1.0 - penalty - 0.01 * (20 - calls.cloud), seconds=0.01)

    result = two_stage_search(measure, 20, target=0.8, smoothings=(0.3, 0.0, 0.6), progress=False)
    assert_chosen_is_minimal_feasible(result)
    assert result.chosen.params.smoothing == 0.6
    assert result.chosen.params.approximates
    tried = [p.params.smoothing for p in result.log if p.stage == "stage1" and p.params.approx_interval == 1]
    assert tried[:3] == [0.3, 0.0, 0.6]


def test_infeasible_start_moves_the_switch_later_or_falls_back_to_cloud():
    # only points with at least 18 cloud calls pass: stage one cannot move, stage two raises s
    def measure(params: CollaborationParams) -> Measurement:
        return Measurement(1.0 if expected_unet_calls(params).cloud >= 18 else 0.0, 0.01)

    result = two_stage_search(measure, 20, target=0.9, progress=False)
    assert_chosen_is_minimal_feasible(result)
    assert result.chosen.cloud_calls == 18
    assert result.chosen.stage == "stage2"

    never = two_stage_search(
        lambda p: Measurement(1.0 if p.switch_step == 20 and not p.approximates else 0.0, 0.0), 20
    )
    assert never.chosen.stage == "baseline"  # nothing else passes: cloud-only


def test_search_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"target=1\.5"):
        two_stage_search(cloud_share_quality, 20, target=1.5, progress=False)
    with pytest.raises(ValueError, match="initial switch step s=1"):
        two_stage_search(cloud_share_quality, 20, initial_switch_step=1, progress=False)


def test_search_cli_on_tiny_random_writes_params_and_log(monkeypatch, tmp_path, capsys):
    """End to end on tiny-random; quality is fidelity to the cloud-only images (the first measured set)."""
    reference: list[np.ndarray] = []

    def fidelity(images, prompts):
        arrays = [np.asarray(image, dtype=np.float32) for image in images]
        if not reference:
            reference.extend(arrays)
        return (
            1.0 - float(np.mean([np.abs(a - r).mean() for a, r in zip(arrays, reference, strict=True)])) / 255
        )

    monkeypatch.setitem(search.QUALITY_FUNCTIONS, "judge", fidelity)
    monkeypatch.setattr(search, "heldout_prompts", lambda n, seed=0: ["a red circle", "a blue square"][:n])
    argv = ["--out", str(tmp_path), "--cloud", "tiny-random", "--edge", "tiny-random-edge", "--n", "2"]
    argv += ["--steps", "8", "--target", "0.97", "--smoothings", "0.3,0.6", "--no-progress"]
    assert search.main(argv) == 0
    assert "chosen p=" in capsys.readouterr().out
    chosen = json.loads((tmp_path / "params.json").read_text())
    with (tmp_path / "search_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == LOG_COLUMNS
    assert rows[0]["stage"] == "baseline" and float(rows[0]["quality"]) == 1.0
    feasible = [row for row in rows if row["feasible"] == "True"]
    assert all(float(row["quality"]) >= chosen["threshold"] for row in feasible)
    assert chosen["quality"] >= chosen["threshold"] == pytest.approx(0.97)
    assert chosen["unet_calls"]["cloud"] == min(int(row["cloud_calls"]) for row in feasible)
    assert chosen["evaluations"] == len(rows)
    params = CollaborationParams(
        8,
        chosen["switch_step"],
        chosen["warmup_steps"],
        chosen["approx_interval"] or 0,
        chosen["smoothing"] or 0.0,
    )
    assert expected_unet_calls(params).to_dict() == chosen["unet_calls"]
