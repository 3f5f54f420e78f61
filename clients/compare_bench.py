"""`diffusionx bench compare [--quick] [--out DIR]`: every mode, and the router against a fixed policy, on one
workload against the served application (the paper's table, ours).

Method (every figure is measured through HTTP with `clients.loadgen`, the same code as `diffusionx loadgen`):
1. Modes. `--sessions` sessions per mode, Poisson arrivals at `--session-rate`, each `--rounds` rounds
   with think times (not counted as latency). `diffusionx`: edge previews and edits, then a finalize; every
   other mode makes each round with `/v1/generate` in that mode and keeps the last round's image. Session
   latency is the sum of a session's request latencies; costs are UNet calls summed over the session;
   quality is the shapes judge's accuracy of the kept image against its prompt. Before them, the same
   schedule of other sessions in the `diffusionx` mode, unmeasured (run `mode-warm`): a fresh application's
   first loaded run can be slower than the ones after it, and the first mode would pay for that alone.
2. Capacity. The router experiment's finalizes refine at `--finalize-strength` (default 1.0, as a
   preview that needs a full redo; the learned predictor asks for 1-2 cloud steps on the shapes previews,
   which never loads the cloud tier: the ingress and the client would be the bottleneck, not what the
   router decides on). `UNLOADED_FINALIZES` of them, one at a time, give the unloaded latency; the
   latency target is `--target-x` times its p50. The capacity is measured (`clients.capacity`):
   `capacity.WAVES` times the cloud replicas' summed batch size of them at once (speculation off, no
   target; run `capacity`) keep every batch full, and the rate at which the middle half of them
   completes is the finalizes per second the tier sustains.
3. Router against fixed. Finalizes of previews made beforehand, Poisson at `--load-x` times capacity for
   `--load-s` seconds, the same arrivals twice: `router` sends the latency target (the router cuts steps,
   strength, or falls back to the edge), `fixed` sends none (the given strength, full steps, no routing).
   SLO attainment is the share of finalizes answered 2xx within the target; the calibration is the median
   over the router's cloud-routed finalizes of expected / measured latency.
   Against the local application steps 2 and 3 each start it afresh (the modes and the router's run may
   have scaled the cloud tier up, and replicas on one machine share its cores; the router starts without
   the calibration the capacity run taught the application). With `--url` the router runs after it.
4. Ordering. The `fixed` run again on an application whose step batcher runs in arrival order
   (`cloud_step_order: fifo`) against the default shortest-job-first (the `fixed` run of step 3).
   Needs the local application (skipped with `--url`).
5. Speculation. DiffusionX sessions with speculative refinement on and off, at low load and at
   `--load-x` times capacity with the router's target (`clients.speculation_bench`). With
   `--speculation-only`, steps 2 and 5 only (summary: `router` with the target, and `speculation`).

Writes `DIR/summary.json` (`null` where a run had no successful request),
`DIR/requests.csv` (every request of every run, with its run's name), `DIR/modes.csv`, `DIR/policies.csv`
and PNG plots: latency CDFs per mode and per policy, cost against quality, expected against measured.
`DIR` defaults to `bench_results/compare/`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from clients import loadgen_rows, speculation_bench
from clients.capacity import Capacity, capacity_run_size, measured_capacity
from clients.client import AsyncDiffusionXClient
from clients.loadgen import COLUMNS, clip_judge, run_loadgen, shapes_judge
from clients.workload import poisson_arrivals
from diffusionx.experiments.outputs import bench_results_dir
from diffusionx.requests import Mode

MODES = tuple(mode.value for mode in Mode)
SESSIONS, QUICK_SESSIONS = 24, 4  # per mode
LOAD_S, QUICK_LOAD_S = 60.0, 20.0  # seconds of finalize arrivals per router run
UNLOADED_FINALIZES = 6  # one at a time, UNLOADED_GAP_S apart: the unloaded latency of the router's finalizes
UNLOADED_GAP_S = 1.0
FIELDS = (
    "session_latency_s_mean",
    "finalize_latency_s_p50",
    "finalize_latency_s_p95",
    "cloud_unet_calls",
    "edge_unet_calls",
    "quality",
    "slo_attainment",
)


# -- the report, from rows ---------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarize(rows: list[dict[str, Any]], latency_target_ms: float | None) -> dict[str, Any]:
    """The summary fields of one run. A session is the rows sharing `session` (a finalize-only run: each
    finalize is its own session). Costs are means per session over every request sent (a failed request
    cost what it reported: nothing); quality and latencies are over the 2xx finalizes; SLO attainment is the
    share of all finalizes sent that were answered 2xx within the target."""
    sessions = loadgen_rows.sessions(rows)
    finalizes = [row for row in rows if row["kind"] == "finalize"]
    ok_final = [row for row in finalizes if loadgen_rows.ok(row)]
    latencies = loadgen_rows.finalize_latencies_s(rows)
    quality = [q for q in (loadgen_rows.number(row["quality"]) for row in ok_final) if q is not None]
    return {
        "session_latency_s_mean": _mean(list(loadgen_rows.session_latencies_s(rows).values())),
        "finalize_latency_s_p50": _pct(latencies, 50),
        "finalize_latency_s_p95": _pct(latencies, 95),
        "cloud_unet_calls": _mean(
            [sum(loadgen_rows.number(r["cloud_unet_calls"]) or 0.0 for r in g) for g in sessions.values()]
        ),
        "edge_unet_calls": _mean(
            [sum(loadgen_rows.number(r["edge_unet_calls"]) or 0.0 for r in g) for g in sessions.values()]
        ),
        "quality": _mean(quality),
        "slo_attainment": _slo_attainment(rows, latency_target_ms),
        "requests": len(rows),
        "sessions": len(sessions),
        "finalizes": len(finalizes),
        "errors": sum(1 for row in rows if not loadgen_rows.ok(row)),
    }


def _slo_attainment(rows: list[dict[str, Any]], latency_target_ms: float | None) -> float | None:
    if latency_target_ms is None:
        return None
    within, sent = loadgen_rows.finalizes_within(rows, latency_target_ms)
    return round(within / sent, 4) if sent else None


def calibration(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of expected / measured latency over the 2xx cloud-routed finalizes that had a prediction."""
    ratios = [
        float(row["expected_latency_ms"]) / float(row["e2e_ms"])
        for row in rows
        if row["kind"] == "finalize"
        and loadgen_rows.ok(row)
        and row["route"] in ("cloud", "cloud-reduced")
        and loadgen_rows.number(row["expected_latency_ms"])
        and float(row["e2e_ms"]) > 0
    ]
    return {"expected_over_measured_median": _pct(ratios, 50), "n": len(ratios)}


# -- runs ------------------------------------------------------------------------------------------------
def _loadgen(url: str, workload: str, arrivals: list[float], settings: argparse.Namespace, **extra: Any):
    config = speculation_bench.loadgen_config(url, workload, arrivals, settings, **extra)
    judge = (
        shapes_judge()
        if settings.quality
        else clip_judge(settings.alignment_model)
        if getattr(settings, "alignment_model", None)
        else None
    )
    rows, _ = asyncio.run(run_loadgen(config, judge=judge))
    return rows


def run_compare(url: str, settings: argparse.Namespace, restart=None) -> dict[str, Any]:
    """Steps 1-4 of the module docstring against `url`; `restart(overrides) -> url` redeploys the local
    application with other args (None: skip the ordering experiment)."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    only = settings.speculation_only
    # 1. every mode on the same sessions
    session_arrivals = poisson_arrivals(
        settings.session_rate, 3600.0, settings.sessions, random.Random(settings.seed)
    )
    if not only:
        # unmeasured first: a fresh application's first loaded run can be slower than the ones after it,
        # and the first mode would pay for that alone; other sessions (another seed), so that none of
        # their speculations or cached previews answers a measured session
        warm = speculation_bench.loadgen_config(url, "sessions", session_arrivals, settings)
        warm = replace(warm, seed=settings.seed + speculation_bench.WARM_SEED_OFFSET)
        [runs["mode-warm"]] = speculation_bench.run_together(url, [warm], False).rows
    for mode in () if only else MODES:
        print(f"compare: mode {mode}: {settings.sessions} sessions x {settings.rounds} rounds", flush=True)
        runs[f"mode-{mode}"] = _loadgen(url, "sessions", session_arrivals, settings, mode=mode)
    # 2. capacity and the latency target, from the router experiment's finalizes one at a time, on a fresh
    # application when the bench runs it: the modes may have scaled the cloud tier up (the embedded config
    # autoscales it, 1-2 replicas), and the capacity counts every replica, while replicas on one machine
    # share its cores (a run sized on 2 replicas here offered 39 finalizes/s against the 7-10 one serves)
    if restart is not None and not only:
        url = restart({})
    strength = settings.finalize_strength
    gaps = [UNLOADED_GAP_S * i for i in range(UNLOADED_FINALIZES)]
    runs["unloaded"] = _loadgen(url, "finalize", gaps, settings, finalize_strength=strength)
    unloaded = loadgen_rows.ok_finalizes(runs["unloaded"])
    if not unloaded:
        raise RuntimeError(f"no unloaded finalize succeeded: cannot size the load ({runs['unloaded'][:1]})")
    unloaded_ms = float(np.median([float(r["e2e_ms"]) for r in unloaded]))
    target_ms = round(settings.target_x * unloaded_ms, 1)
    burst = [0.0] * capacity_run_size(url)
    runs["capacity"] = _loadgen(
        url, "finalize", burst, settings, finalize_strength=strength, speculation="off"
    )
    capacity = measured_capacity(runs["capacity"])
    rate = settings.load_x * capacity.per_s
    print(
        f"compare: finalizes at strength {strength:g}: {capacity.steps:.1f} cloud steps, unloaded p50 "
        f"{unloaded_ms:.0f} ms; capacity {capacity.per_s:.2f}/s (measured); target {target_ms:.0f} ms; "
        f"offering {rate:.2f}/s for {settings.load_s:g} s",
        flush=True,
    )
    # 3. router against fixed on the same arrivals
    arrivals = poisson_arrivals(
        rate, settings.load_s, settings.max_finalizes, random.Random(settings.seed + 1)
    )
    if only:
        return _speculation_only(url, settings, runs, target_ms, unloaded_ms, capacity, restart, out)
    if restart is not None:  # the router starts without what the capacity run taught the application
        url = restart({})
    loaded = {"finalize_strength": strength}
    runs["policy-router"] = _loadgen(
        url, "finalize", arrivals, settings, latency_target_ms=target_ms, **loaded
    )
    if restart is not None:  # fixed starts with the replicas the router's run started with
        url = restart({})
    runs["policy-fixed"] = _loadgen(url, "finalize", arrivals, settings, **loaded)
    # 4. ordering: the fixed run again with the step batcher in arrival order
    if restart is not None:
        fifo_url = restart({"cloud_step_order": "fifo"})
        runs["order-fifo"] = _loadgen(fifo_url, "finalize", arrivals, settings, **loaded)
    # 5. speculation on and off
    speculation, speculation_runs = speculation_bench.run_speculation(
        url, settings, summarize, capacity, target_ms, restart
    )
    runs.update(speculation_runs)
    summary = {
        "modes": {mode: _public(summarize(runs[f"mode-{mode}"], target_ms)) for mode in MODES},
        "router": {
            "latency_target_ms": target_ms,
            "finalize_strength": strength,
            "unloaded_finalize_ms_p50": round(unloaded_ms, 1),
            "offered_load_x_capacity": settings.load_x,
            "capacity_finalizes_per_s": round(capacity.per_s, 4),
            "offered_finalizes": len(arrivals),
            "policies": {
                name: _public(summarize(runs[f"policy-{name}"], target_ms)) for name in ("router", "fixed")
            },
            "calibration": calibration(runs["policy-router"]),
        },
        "ordering": {
            "sjf": {"finalize_latency_s_mean": _final_mean(runs["policy-fixed"])},
            "fifo": {
                "finalize_latency_s_mean": _final_mean(runs["order-fifo"]) if "order-fifo" in runs else None
            },
        },
        "speculation": speculation,
        "counts": {name: summarize(rows, target_ms) for name, rows in runs.items()},
        "settings": {k: v for k, v in vars(settings).items() if isinstance(v, int | float | str | bool)},
    }
    write_outputs(summary, runs, out)
    return summary


def _speculation_only(
    url: str,
    settings: argparse.Namespace,
    runs: dict[str, list[dict[str, Any]]],
    target_ms: float,
    unloaded_ms: float,
    capacity: Capacity,
    restart: Any,
    out: Path,
) -> dict[str, Any]:
    """Step 5 alone (after step 2 gave the latency target): summary.json with `router` and `speculation`."""
    speculation, speculation_runs = speculation_bench.run_speculation(
        url, settings, summarize, capacity, target_ms, restart
    )
    runs.update(speculation_runs)
    summary = {
        "router": {
            "latency_target_ms": target_ms,
            "finalize_strength": settings.finalize_strength,
            "unloaded_finalize_ms_p50": round(unloaded_ms, 1),
            "capacity_finalizes_per_s": round(capacity.per_s, 4),
        },
        "speculation": speculation,
        "counts": {name: summarize(rows, target_ms) for name, rows in runs.items()},
        "settings": {k: v for k, v in vars(settings).items() if isinstance(v, int | float | str | bool)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_requests(runs, out)
    speculation_bench.plot(runs, out)
    return summary


def _write_requests(runs: dict[str, list[dict[str, Any]]], out: Path) -> None:
    with (out / "requests.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("run", *COLUMNS))
        writer.writeheader()
        for name, rows in runs.items():
            writer.writerows({"run": name, **row} for row in rows)


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    return {name: summary[name] for name in FIELDS}


def _final_mean(rows: list[dict[str, Any]]) -> float | None:
    return _mean(loadgen_rows.finalize_latencies_s(rows))


# -- outputs ---------------------------------------------------------------------------------------------
def write_outputs(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]], out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_requests(runs, out)
    for filename, table in (("modes.csv", summary["modes"]), ("policies.csv", summary["router"]["policies"])):
        with (out / filename).open("w", newline="") as handle:
            table_writer = csv.writer(handle)
            table_writer.writerow(("name", *FIELDS))
            table_writer.writerows((name, *(values[f] for f in FIELDS)) for name, values in table.items())
    plot(summary, runs, out)
    speculation_bench.plot(runs, out)


def plot(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cdf(axis, rows: list[dict[str, Any]], label: str) -> None:
        values = np.sort(loadgen_rows.finalize_latencies_s(rows))
        if values.size:
            axis.plot(values, np.arange(1, values.size + 1) / values.size, label=label)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        cdf(axes[0], runs[f"mode-{mode}"], mode)
    axes[0].set(title="final image latency per mode", xlabel="seconds", ylabel="CDF")
    for name in ("policy-router", "policy-fixed", "order-fifo"):
        if name in runs:
            cdf(axes[1], runs[name], name.split("-", 1)[1])
    target = summary["router"]["latency_target_ms"] / 1000.0
    axes[1].axvline(target, color="grey", linestyle="--", label="latency target")
    axes[1].set(
        title=f"finalize latency at {summary['router']['offered_load_x_capacity']}x capacity",
        xlabel="seconds",
    )
    for axis in axes:
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, values in [*summary["modes"].items(), *summary["router"]["policies"].items()]:
        if values["cloud_unet_calls"] is not None and values["quality"] is not None:
            axis.scatter(values["cloud_unet_calls"], values["quality"])
            axis.annotate(name, (values["cloud_unet_calls"], values["quality"]))
    axis.set(title="cost against quality", xlabel="cloud UNet calls per session", ylabel="judge accuracy")
    figure.tight_layout()
    figure.savefig(out / "cost_quality.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 5))
    pairs = [
        (float(r["e2e_ms"]), float(r["expected_latency_ms"]))
        for r in runs["policy-router"]
        if r["kind"] == "finalize"
        and loadgen_rows.ok(r)
        and loadgen_rows.number(r["expected_latency_ms"])
        and r["route"] != "edge-fallback"
    ]
    if pairs:
        measured, expected = zip(*pairs, strict=True)
        axis.scatter(measured, expected, s=10)
        top = max(*measured, *expected)
        axis.plot([0, top], [0, top], color="grey", linestyle="--")
    axis.set(title="router: expected against measured", xlabel="measured ms", ylabel="expected ms")
    figure.tight_layout()
    figure.savefig(out / "expected_measured.png", dpi=110)
    plt.close(figure)


# -- command line ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small runs: {QUICK_SESSIONS} sessions per mode, {QUICK_LOAD_S:g} s of finalize arrivals",
    )
    parser.add_argument(
        "--out",
        default=bench_results_dir("compare"),
        help="output directory (default bench_results/compare/)",
    )
    parser.add_argument("--url", help="a running server (default: start the local app; no ordering run)")
    parser.add_argument("--config", help="serve config for the local app (default: the embedded CPU app)")
    parser.add_argument("--port", type=int, default=8000, help="port of the local app (default 8000)")
    parser.add_argument(
        "--sessions", type=int, help=f"sessions per mode (default {SESSIONS}, quick {QUICK_SESSIONS})"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per session (default 3)")
    parser.add_argument("--think-s", type=float, default=1.0, help="mean think time (not counted)")
    parser.add_argument("--session-rate", type=float, default=0.5, help="session arrivals per second")
    parser.add_argument("--steps", type=int, help="num_inference_steps of final images (model default)")
    parser.add_argument("--load-x", type=float, default=2.0, help="finalize load, times capacity (default 2)")
    parser.add_argument(
        "--load-s",
        type=float,
        help=f"seconds of finalize arrivals (default {LOAD_S:g}, quick {QUICK_LOAD_S:g})",
    )
    parser.add_argument("--max-finalizes", type=int, default=400, help="cap on finalize arrivals per run")
    parser.add_argument("--target-x", type=float, default=2.5, help="target = this x unloaded finalize p50")
    parser.add_argument(
        "--finalize-strength",
        type=float,
        default=1.0,
        help="refine strength of the router experiment's finalizes (default 1.0)",
    )
    parser.add_argument("--preview-pool", type=int, default=8, help="previews made before finalize runs")
    parser.add_argument("--drain-s", type=float, default=120.0, help="no request sent after arrivals + this")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="client timeout per request")
    parser.add_argument("--seed", type=int, default=0, help="arrivals, prompts, image seeds (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--alignment-model",
        default=None,
        help="servers of real models (no judge): the quality column is the CLIP score of this alignment "
        "model, a registered name or a local path (e.g. clip-vit-large-patch14); default: no quality",
    )
    speculation_bench.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    args.sessions = args.sessions or (QUICK_SESSIONS if args.quick else SESSIONS)
    args.load_s = args.load_s or (QUICK_LOAD_S if args.quick else LOAD_S)
    started = time.perf_counter()
    if args.url:
        health = asyncio.run(_health(args.url))
        args.quality = (health.get("cloud") or {}).get("family") == "shapes"
        summary = run_compare(args.url, args)
    else:
        from deployments.local import load_config, start_local_app, stop_local_app

        config_args = load_config(args.config).applications[0].args
        args.quality = "shapes" in str(config_args.get("cloud_model", ""))

        def restart(overrides: dict[str, Any]) -> str:
            stop_local_app()
            return start_local_app(args.config, port=args.port, overrides=overrides)

        try:
            summary = run_compare(start_local_app(args.config, port=args.port), args, restart)
        finally:
            stop_local_app()
    print(
        json.dumps(
            {k: summary[k] for k in ("modes", "router", "ordering", "speculation") if k in summary}, indent=2
        )
    )
    print(f"compare: done in {time.perf_counter() - started:.0f} s; wrote {args.out}/summary.json")
    return 0


async def _health(url: str) -> dict[str, Any]:
    async with AsyncDiffusionXClient(url, 30.0) as client:
        return (await client.health()).details


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
