"""`diffusionx loadgen` and its arrival processes against an in-process fake server (no Ray, no models)."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from clients.loadgen import (
    COLUMNS,
    LoadgenConfig,
    arrivals_from_args,
    check_loopback,
    parse_args,
    run_loadgen,
    shapes_judge,
    write_rows,
)
from clients.workload import poisson_arrivals, ramp_arrivals, think_time_s, trace_arrivals

URL = "http://127.0.0.1:8000"


def png_base64(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class FlakyServer:
    """Answers like the ingress, except: every 4th refine 503 (Retry-After), every 5th 500, and every
    7th request of any kind never gets an answer (connection refused)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []
        self.refines = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.seen.append((request.url.path, body))
        if len(self.seen) % 7 == 0:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/v1/preview":
            return httpx.Response(
                200,
                json={
                    "preview_id": f"p{len(self.seen)}",
                    "image": png_base64((200, 0, 0)),
                    "seed": body["seed"],
                    "num_inference_steps": 8,
                    # an edit without a strength: the server's edit predictor picks 0.7
                    "strength": body.get("strength", 0.7 if "preview_id" in body else None),
                    "unet_calls": {"cloud": 0, "edge": 8, "approximated": 0},
                    "timings_ms": {},
                },
            )
        self.refines += 1
        if self.refines % 4 == 0:
            return httpx.Response(
                503, json={"error": "overloaded", "status": 503}, headers={"Retry-After": "1"}
            )
        if self.refines % 5 == 0:
            return httpx.Response(500, json={"error": "boom", "status": 500})
        return httpx.Response(
            200,
            json={
                "image": png_base64((0, 0, 200)),
                "seed": body["seed"],
                "strength_predicted": 0.5,
                "strength_used": 0.4,
                "num_inference_steps": 15,
                "route": "cloud-reduced",
                "reason": "cut steps",
                "load": {"replicas": 1.0},
                "expected_latency_ms": 812.5,
                "unet_calls": {"cloud": 6, "edge": 0, "approximated": 0},
                "timings_ms": {},
            },
        )


def config(workload: str, arrivals: list[float], **overrides) -> LoadgenConfig:
    fields = dict(duration_s=5.0, rounds=3, think_s=0.001, progress=False, timeout_s=5.0)
    return LoadgenConfig(URL, workload, arrivals, **{**fields, **overrides})


# -- arrivals ----------------------------------------------------------------------------------------------


def test_poisson_arrivals_have_the_rate_and_respect_the_bounds():
    times = poisson_arrivals(20.0, 50.0, 10_000, random.Random(0))
    assert 1000 - 130 <= len(times) <= 1000 + 130  # 4 sigma of a Poisson count of mean 1000
    assert times == sorted(times) and times[0] > 0 and times[-1] < 50.0
    assert len(poisson_arrivals(20.0, 50.0, 10, random.Random(0))) == 10
    with pytest.raises(ValueError, match="rate=0"):
        poisson_arrivals(0.0, 1.0, 10, random.Random(0))


def test_a_ramp_rises_linearly():
    times = ramp_arrivals(0.0, 40.0, 50.0, 10_000, random.Random(1))
    first_half = sum(t < 25.0 for t in times)
    # expected 250 in the first half and 750 in the second
    assert 1000 - 130 <= len(times) <= 1000 + 130
    assert 2.4 <= (len(times) - first_half) / first_half <= 3.7
    with pytest.raises(ValueError, match="not both 0"):
        ramp_arrivals(0.0, 0.0, 1.0, 10, random.Random(0))


def test_trace_arrivals_are_relative_scaled_and_checked(tmp_path: Path):
    trace = tmp_path / "trace.csv"
    trace.write_text("timestamp_ms,prompt_tokens\n1000,12\n1500,7\n\n3000\n9000,1\n")
    read = trace_arrivals(trace, 2.0, 10.0, 100)
    assert read.arrivals == [0.0, 1.0, 4.0]  # 9000 ms -> 16 s, past the duration
    assert (read.lines, read.out_of_order) == (4, 0)
    assert trace_arrivals(trace, 1.0, 100.0, 2).arrivals == [0.0, 0.5]
    trace.write_text("1000\nsoon\n")
    with pytest.raises(ValueError, match=r"trace.csv:2: .* milliseconds, got 'soon'"):
        trace_arrivals(trace, 1.0, 10.0, 10)
    trace.write_text("\n\n")
    with pytest.raises(ValueError, match="no arrival times"):
        trace_arrivals(trace, 1.0, 10.0, 10)


def test_a_trace_out_of_time_order_is_sorted_and_its_late_lines_counted(tmp_path: Path):
    # DiffServe's trace format (trace_1to8qps.txt): `arrival_ms,prompt_index`, no header, the first arrival
    # after 0, and lines not all in time order
    trace = tmp_path / "trace_1to8qps.txt"
    trace.write_text("636.0,4817\n1058.0,2143\n4757.0,2414\n4400.0,200\n4300.0,3315\n5000.0,2354\n")
    read = trace_arrivals(trace, 1.0, 60.0, 100)
    assert read.out_of_order == 2  # 4400 and 4300 both come after 4757
    assert read.arrivals == pytest.approx([0.0, 0.422, 3.664, 3.764, 4.121, 4.364])
    # whitespace-separated columns read the same
    trace.write_text("636.0 4817\n1058.0\t2143\n500 7\n")
    read = trace_arrivals(trace, 1.0, 60.0, 100)
    assert read.arrivals == pytest.approx([0.0, 0.136, 0.558]) and read.out_of_order == 1


def test_loadgen_replays_an_unordered_trace_with_a_note(tmp_path: Path, capsys):
    trace = tmp_path / "trace.txt"
    trace.write_text("2000,1\n1000,2\n3000,3\n")
    args = parse_args(["--url", "http://127.0.0.1:8000", "--trace", str(trace)])
    assert arrivals_from_args(args) == [0.0, 1.0, 2.0]
    assert f"note: 1 of the 3 arrivals in {trace} are out of time order" in capsys.readouterr().err
    trace.write_text("1000,2\n2000,1\n")
    assert arrivals_from_args(args) == [0.0, 1.0]
    assert "note" not in capsys.readouterr().err


def test_think_times_are_lognormal_with_the_given_mean():
    rng = random.Random(2)
    samples = sorted(think_time_s(2.0, rng) for _ in range(20_000))
    assert sum(samples) / len(samples) == pytest.approx(2.0, rel=0.03)
    assert samples[len(samples) // 2] == pytest.approx(2.0 * 0.835, rel=0.04)  # median below the mean
    assert think_time_s(0.0, rng) == 0.0


def test_only_loopback_unless_allowed():
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "http://127.0.0.2"):
        check_loopback(url)
    for url in ("http://example.com", "http://10.0.0.1:8000", "https://8.8.8.8"):
        with pytest.raises(ValueError, match="--allow-remote"):
            check_loopback(url)
    with pytest.raises(SystemExit):
        parse_args(["--url", "http://example.com", "--rate", "1"])
    assert parse_args(["--url", "http://example.com", "--rate", "1", "--allow-remote"]).rate == 1.0


# -- every request sent gets a row -----------------------------------------------------------------------


def test_sessions_record_every_request_whatever_happened(tmp_path: Path):
    server = FlakyServer()
    arrivals = [0.005 * i for i in range(12)]
    rows, setup = asyncio.run(
        run_loadgen(config("sessions", arrivals), httpx.MockTransport(server), judge=shapes_judge())
    )
    assert setup == [] and len(rows) == len(server.seen)
    statuses = {row["status"] for row in rows}
    assert {200, 503, 500, "ConnectionFailed"} <= statuses
    kinds = [row["kind"] for row in rows]
    assert kinds.count("preview") == 12 and set(kinds) == {"preview", "edit", "finalize"}
    # a failed round ends its session: never more edits than the previews that succeeded allow
    ok_previews = sum(r["status"] == 200 and r["kind"] == "preview" for r in rows)
    assert kinds.count("finalize") <= ok_previews
    for row in rows:
        assert row["e2e_ms"] >= 0 and row["arrival_s"] >= 0
        if row["status"] == 200:
            assert 0.0 <= row["quality"] <= 1.0
            assert row["edge_unet_calls"] == (8 if row["kind"] != "finalize" else 0)
        else:
            assert row["quality"] == "" and row["route"] == ""
    finals = [r for r in rows if r["kind"] == "finalize" and r["status"] == 200]
    assert finals and all(
        (r["route"], r["strength_used"], r["expected_latency_ms"], r["cloud_unet_calls"])
        == ("cloud-reduced", 0.4, 812.5, 6)
        for r in finals
    )
    edits = [r for r in rows if r["kind"] == "edit" and r["status"] == 200]
    assert edits and all(r["strength_used"] == 0.7 for r in edits)  # no --edit-strength: predicted

    path = write_rows(rows, tmp_path / "requests.csv")
    with path.open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        assert len(list(reader)) == len(rows)


def test_finalize_workload_makes_previews_first_and_caps_requests():
    server = FlakyServer()
    rows, setup = asyncio.run(
        run_loadgen(
            config("finalize", [0.001 * i for i in range(10)], max_requests=6, preview_pool=3),
            httpx.MockTransport(server),
        )
    )
    assert [row["kind"] for row in setup] == ["preview"] * 3
    assert len(rows) == 6 and all(row["kind"] == "finalize" for row in rows)
    assert len(rows) + len(setup) == len(server.seen)
    assert all(row["quality"] == "" for row in rows)  # no judge given


def test_latency_ends_with_the_answer_not_with_judging_it(caplog):
    """`e2e_ms` is the server's answer time: a judge slower than every answer is not in it, and a judge that
    fails leaves the quality empty, not the request failed."""
    import time

    server = FlakyServer()

    def slow_judge(result, prompt):
        time.sleep(0.2)
        return 1.0

    def broken_judge(result, prompt):
        raise ValueError("unreadable")

    arrivals = [0.0, 0.001, 0.002]
    rows, _ = asyncio.run(run_loadgen(config("preview", arrivals), httpx.MockTransport(server), slow_judge))
    ok = [row for row in rows if row["status"] == 200]
    assert ok and all(row["quality"] == 1.0 and row["e2e_ms"] < 150.0 for row in ok)
    rows, _ = asyncio.run(run_loadgen(config("preview", arrivals), httpx.MockTransport(server), broken_judge))
    ok = [row for row in rows if row["status"] == 200]
    assert ok and all(row["quality"] == "" and row["route"] == "" for row in ok)
    assert "could not judge" in caplog.text


def test_preview_workload_stops_sending_after_the_time_limit():
    server = FlakyServer()
    rows, _ = asyncio.run(
        run_loadgen(
            config("preview", [0.0, 0.01, 0.3], duration_s=0.1, drain_s=0.05), httpx.MockTransport(server)
        )
    )
    assert len(rows) == len(server.seen) == 2


def test_importing_the_load_generator_does_not_import_torch():
    code = "import sys, clients.loadgen; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_sessions_in_another_mode_make_every_round_with_generate():
    seen: list[dict] = []

    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        assert request.url.path == "/v1/generate"
        return httpx.Response(
            200,
            json={
                "image": png_base64((0, 0, 200)),
                "mode": body["mode"],
                "seed": body["seed"],
                "num_inference_steps": 10,
                "unet_calls": {"cloud": 4, "edge": 6, "approximated": 0},
                "timings_ms": {},
                "parameters": {"switch_step": 4},
            },
        )

    rows, _ = asyncio.run(
        run_loadgen(config("sessions", [0.0, 0.01], rounds=2, mode="hybrid"), httpx.MockTransport(server))
    )
    assert [body["mode"] for body in seen] == ["hybrid"] * 4
    assert sorted((row["session"], row["kind"]) for row in rows) == [
        (0, "finalize"),
        (0, "preview"),
        (1, "finalize"),
        (1, "preview"),
    ]
    assert all(row["route"] == "hybrid" and row["cloud_unet_calls"] == 4 for row in rows)


def test_compare_report_costs_are_sums_over_requests_and_every_request_counts():
    from clients.compare_bench import calibration, summarize

    def row(session, kind, status, cloud, edge, e2e, quality="", route="", expected=""):
        return {
            "session": session, "kind": kind, "status": status, "cloud_unet_calls": cloud,
            "edge_unet_calls": edge, "e2e_ms": e2e, "quality": quality, "route": route,
            "expected_latency_ms": expected,
        }  # fmt: skip

    rows = [
        row(0, "preview", 200, 0, 8, 100.0),
        row(0, "finalize", 200, 12, 0, 900.0, 0.8, "cloud", 1000.0),
        row(1, "preview", 200, 0, 8, 120.0),
        row(1, "finalize", 503, "", "", 5.0),  # refused: counted, cost nothing, misses the target
        row(2, "preview", "ConnectionFailed", "", "", 3.0),  # the session ended there
    ]
    summary = summarize(rows, latency_target_ms=1000.0)
    assert (summary["requests"], summary["sessions"], summary["finalizes"], summary["errors"]) == (5, 3, 2, 2)
    assert summary["cloud_unet_calls"] * 3 == pytest.approx(12) and summary[
        "edge_unet_calls"
    ] * 3 == pytest.approx(16, abs=1e-3)
    assert summary["session_latency_s_mean"] == pytest.approx(1.0)  # only session 0 completed
    assert summary["slo_attainment"] == 0.5 and summary["quality"] == 0.8
    assert summary["finalize_latency_s_p50"] == pytest.approx(0.9)
    assert calibration(rows) == {"expected_over_measured_median": pytest.approx(1000 / 900, rel=1e-3), "n": 1}
    assert summarize(rows, None)["slo_attainment"] is None
