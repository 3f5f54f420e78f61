"""The demo (script, session run, summary files) and the bench (measurement, summaries, files) against fake
servers: no Ray, no models."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from clients.bench import (
    RequestRecord,
    batches_since,
    bench_prompts,
    distribution,
    format_table,
    parse_args,
    run_level,
    summarize_level,
    write_results,
)
from clients.client import DiffusionXClient
from clients.demo import (
    SCRIPT,
    describe_models,
    format_markdown,
    run_session,
    write_summary,
)
from clients.errors import InvalidRequest
from diffusionx.models.loading import LoadedModel
from diffusionx.sampling.generation import check_prompt_fits
from diffusionx.shapes import data


def _png(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def fake_server(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content) if request.content else {}
    calls = {"cloud": 0, "edge": 4, "approximated": 0}
    timings = {"model_total": 20.0, "queue": 2.0, "batch_size": 1.0}
    if request.url.path == "/v1/preview":
        return httpx.Response(
            200,
            json={
                "preview_id": f"id-{len(body['prompt'])}",
                "image": _png((30, 70, 230)),
                "seed": body["seed"],
                "width": 32,
                "height": 32,
                "num_inference_steps": 8,
                # an edit without a strength: the server's edit predictor would pick one
                "strength": body.get("strength", 0.55 if "preview_id" in body or "image" in body else None),
                "unet_calls": calls,
                "timings_ms": timings,
            },
        )
    if request.url.path == "/v1/refine":
        return httpx.Response(
            200,
            json={
                "image": _png((30, 70, 230)),
                "seed": body["seed"],
                "strength_predicted": 0.35,
                "strength_used": 0.35,
                "num_inference_steps": 20,
                "route": "cloud",
                "reason": "cloud idle: full refinement",
                "load": {"queued_steps": 0.0},
                "unet_calls": {"cloud": 7, "edge": 0, "approximated": 0},
                "timings_ms": timings,
            },
        )
    if body.get("mode") == "hybrid":
        return httpx.Response(422, json={"error": "mode 'hybrid' is not served yet", "status": 422})
    return httpx.Response(
        200,
        json={
            "image": _png((0, 0, 0)),
            "mode": body["mode"],
            "seed": body["seed"],
            "num_inference_steps": 20,
            "unet_calls": {"cloud": 20, "edge": 0, "approximated": 0},
            "timings_ms": timings,
        },
    )


def test_script_is_a_session_of_single_grammar_changes() -> None:
    scenes = [data.parse_caption(step.prompt) for step in SCRIPT]
    assert all(not scene.problems() for scene in scenes)
    changes = [data.diff_scenes(a, b) for a, b in itertools.pairwise(scenes)]
    assert changes == [["colour"], ["move"], ["add"]]
    assert not SCRIPT[0].edit and any(step.edit for step in SCRIPT)


def test_demo_and_bench_prompts_fit_the_tiny_random_tokenizer(tiny_edge: LoadedModel) -> None:
    check_prompt_fits(tiny_edge, [step.prompt for step in SCRIPT])
    prompts = bench_prompts(60, seed=0)
    assert len(prompts) == 60 and len(set(prompts)) > 20
    check_prompt_fits(tiny_edge, prompts)
    assert any(" and " in p for p in prompts)  # two-shape captions too


def test_run_session_writes_images_and_summary(tmp_path: Path) -> None:
    lines: list[str] = []
    with DiffusionXClient("http://demo.test", transport=httpx.MockTransport(fake_server)) as client:
        summary = {"url": "http://demo.test", "models": describe_models({}, {}, embedded=True)}
        run_session(client, tmp_path, summary, seed=3, compare_modes=("cloud", "hybrid"), log=lines.append)
    json_path, md_path = write_summary(summary, tmp_path)

    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [
        "final.png",
        "generate_cloud.png",
        "round_1.png",
        "round_2.png",
        "round_3.png",
        "round_4.png",
        "summary.json",
        "summary.md",
    ]
    saved = json.loads(json_path.read_text())
    assert [r["prompt"] for r in saved["rounds"]] == [step.prompt for step in SCRIPT]
    # edits send no strength and no size, but the previous prompt; they record the predicted strength
    assert [r["edit_strength"] for r in saved["rounds"]] == [0.55 if step.edit else None for step in SCRIPT]
    assert [r["edit_predicted"] for r in saved["rounds"]] == [step.edit for step in SCRIPT]
    assert saved["final"]["prompt"] == SCRIPT[-1].prompt and saved["final"]["route"] == "cloud"
    assert saved["final"]["unet_calls"]["cloud"] == 7 and saved["final"]["strength_used"] == 0.35
    # a blue square is not "a green circle and a yellow square": the judge must not call it a match
    assert 0.0 <= saved["final"]["judge_accuracy"] < 0.5
    assert saved["compare"][1] == {"mode": "hybrid", "error": "[422] mode 'hybrid' is not served yet"}
    assert saved["models"]["edge"] == "shapes-edge"

    markdown = md_path.read_text()
    assert (
        "| 2 | colour (edit) | a large green circle on the left, blue background | 0.55 (predicted) | 8 "
        "| 0/4/0 |" in markdown
    )
    assert "| cloud | 0.350 | 0.350 | 20 | 7/0/0 |" in markdown
    assert "| hybrid | - | - | - | - | [422] mode 'hybrid' is not served yet |" in markdown
    assert "round 4/4 [edit of round 3] " + repr(SCRIPT[3].prompt) in lines
    assert any("edit strength 0.55 predicted" in line for line in lines)


def test_failed_run_summary_says_where_it_stopped(tmp_path: Path) -> None:
    def failing(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("preview_id"):
            return httpx.Response(422, json={"error": "prompt is 20 tokens long", "status": 422})
        return fake_server(request)

    summary: dict[str, Any] = {"url": "http://demo.test", "models": describe_models({}, {}, embedded=True)}
    with (
        DiffusionXClient("http://demo.test", transport=httpx.MockTransport(failing)) as client,
        pytest.raises(InvalidRequest),
    ):
        run_session(client, tmp_path, summary, log=lambda line: None)
    summary["error"] = "InvalidRequest: [422] prompt is 20 tokens long"
    _, md_path = write_summary(summary, tmp_path)
    assert len(summary["rounds"]) == 1 and summary["final"] is None
    assert "**The run stopped early:** InvalidRequest: [422] prompt is 20 tokens long" in md_path.read_text()


def test_models_note_says_when_tiny_random_stands_in() -> None:
    health: dict[str, Any] = {"edge": {"model": "tiny-random-edge"}, "cloud": {"model": "tiny-random"}}
    models = describe_models(health, {}, embedded=False)
    assert (models["edge"], models["cloud"], models["embedded_weights"]) == (
        "tiny-random-edge",
        "tiny-random",
        False,
    )
    assert "not built yet" in models["note"] and "tiny-random" in models["note"]
    summary = {"seed": 0, "rounds": [], "final": None, "compare": [], "models": models}
    assert (
        "Models: edge `tiny-random-edge`, cloud `tiny-random`. The embedded shapes weights"
        in format_markdown(summary)
    )


# -- bench ------------------------------------------------------------------------------------------------


def test_distribution_and_level_summary() -> None:
    dist = distribution([float(v) for v in range(1, 101)] + [None])
    assert dist == {"median": 50.5, "p95": 95.05, "mean": 50.5, "max": 100.0}
    assert distribution([None])["median"] is None
    records = [
        RequestRecord(4, 0, True, None, 0.0, 100.0, 60.0, 5.0, 80.0, 4.0),
        RequestRecord(4, 1, True, None, 1.0, 120.0, 60.0, 25.0, 100.0, 4.0),
        RequestRecord(4, 2, False, "Overloaded: [503] busy", 2.0, 3.0),
    ]
    level = summarize_level(records, 4, wall_s=0.5, stats_batch_sizes=[4, 2])
    assert (level["ok"], level["errors"], level["throughput_rps"]) == (2, {"Overloaded": 1}, 4.0)
    assert level["overhead_ms"]["median"] == 50.0 and level["e2e_ms"]["max"] == 120.0
    assert level["overhead_share"]["median"] == 0.833  # 40/60 and 60/60
    assert level["stats_batch_sizes"]["mean"] == 3.0
    row = format_table([level]).splitlines()[-1]
    assert row.startswith(
        "| 4 | 2 / 3 | Overloaded 1 | 4.00 | 110 / 119 | 60 / 60 | 50 / 59 | 83.3% / 98.3% |"
    )


def test_batches_since_takes_the_tail_that_served_the_level() -> None:
    assert batches_since([1, 1, 4, 4, 2], requests_served=6) == [4, 2]
    assert batches_since([1, 4, 4], requests_served=20) == [1, 4, 4]  # window shorter than the level
    assert batches_since([3, 3], requests_served=0) == []


def test_run_level_keeps_concurrency_in_flight_and_records_server_timings(tmp_path: Path) -> None:
    in_flight, peak, seen = 0, 0, []

    async def server(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        body = json.loads(request.content)
        seen.append(body["seed"])
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if body["seed"] == 5:
            return httpx.Response(503, json={"error": "busy", "status": 503}, headers={"Retry-After": "1"})
        timings = {"model_total": 4.0, "queue": 1.0, "server_total": 6.0, "batch_size": float(peak)}
        return httpx.Response(
            200,
            json={
                "preview_id": f"p{body['seed']}",
                "image": _png((0, 0, 0)),
                "seed": body["seed"],
                "unet_calls": {"cloud": 0, "edge": 2, "approximated": 0},
                "timings_ms": timings,
            },
        )

    prompts = [f"prompt {i}" for i in range(12)]
    records, wall_s = asyncio.run(
        run_level(
            "http://bench.test",
            4,
            prompts,
            5.0,
            {"num_inference_steps": 2},
            False,
            httpx.MockTransport(server),
        )
    )
    assert peak == 4 and sorted(seen) == list(range(12)) and wall_s > 0
    assert [r.index for r in records] == list(range(12))
    failed = [r for r in records if not r.ok]
    assert len(failed) == 1 and failed[0].index == 5 and failed[0].error.startswith("Overloaded: [503] busy")
    ok = records[0]
    assert (ok.model_ms, ok.queue_ms, ok.server_ms) == (4.0, 1.0, 6.0) and ok.overhead_ms == ok.e2e_ms - 4.0

    level = summarize_level(records, 4, wall_s, [])
    report = {
        "setup": {
            "url": "http://bench.test",
            "started_local_app": False,
            "models": {"edge": "tiny-random-edge"},
            "requests_per_level": 12,
            "machine": "test",
        },
        "levels": [level],
    }
    paths = write_results(report, records, tmp_path)
    assert [p.name for p in paths] == [
        "preview.json",
        "preview_levels.csv",
        "preview_requests.csv",
        "preview.md",
    ]
    rows = list(csv.DictReader(paths[2].open()))
    assert len(rows) == 12 and rows[5]["ok"] == "False"
    assert json.loads(paths[0].read_text())["levels"][0]["ok"] == 11
    assert "| 4 | 11 / 12 | Overloaded 1 |" in paths[3].read_text()


def test_bench_refine_reuses_the_level_runner_and_writes_its_own_files(tmp_path: Path) -> None:
    """`bench refine`: the same runner and summaries, POST /v1/refine with the preview id and strength."""
    args = parse_args(["refine", "--strength", "0.3", "--requests", "6", "--concurrency", "1,2"])
    assert (args.benchmark, args.strength, args.concurrency) == ("refine", 0.3, [1, 2])
    with pytest.raises(SystemExit):
        parse_args(["refine", "--strength", "1.5"])
    bodies = []

    async def server(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/refine"
        body = json.loads(request.content)
        bodies.append(body)
        timings = {"model_total": 40.0, "queue": 2.0, "server_total": 45.0, "batch_size": 1.0}
        return httpx.Response(
            200,
            json={
                "image": _png((0, 0, 0)),
                "seed": body["seed"],
                "strength_predicted": None,
                "strength_used": body["strength"],
                "num_inference_steps": 10,
                "route": "cloud",
                "reason": "strength given",
                "load": {},
                "unet_calls": {"cloud": 3, "edge": 0, "approximated": 0},
                "timings_ms": timings,
            },
        )

    kwargs = {"preview_id": "p0", "strength": 0.3}
    records, wall_s = asyncio.run(
        run_level(
            "http://bench.test", 2, ["a", "b", "c"], 5.0, kwargs, False, httpx.MockTransport(server), "refine"
        )
    )
    assert all(r.ok for r in records) and [r.model_ms for r in records] == [40.0] * 3
    assert {(b["preview_id"], b["strength"]) for b in bodies} == {("p0", 0.3)}
    level = summarize_level(records, 2, wall_s, [])
    report = {
        "benchmark": "refine",
        "setup": {
            "url": "u",
            "started_local_app": False,
            "models": {},
            "requests_per_level": 3,
            "machine": "test",
        },
        "levels": [level],
    }
    paths = write_results(report, records, tmp_path)
    assert [p.name for p in paths] == ["refine.json", "refine_levels.csv", "refine_requests.csv", "refine.md"]
    assert paths[3].read_text().startswith("# Refine benchmark")
