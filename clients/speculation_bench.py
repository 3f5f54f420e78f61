"""The speculation experiment of `diffusionx bench compare` (step 5 there; alone with `--speculation-only`):
DiffusionX sessions with speculative refinement on and off, on the same arrivals and think times.

Method (every figure through HTTP with `clients.loadgen`):
1. Capacity. `UNLOADED` sessions one at a time (speculation off, other prompts than the measured
   sessions') give the cloud steps of a session's finalize at the predicted strength; the cloud tier's
   capacity in such finalizes is the denoising steps per second `bench compare` measured in its capacity
   run (`clients.capacity`) over those steps. Their summed request latency `S` (a preview, the edits,
   the finalize) gives the sessions per second the application serves one request at a time, `1 / S`.
2. Low load. Sessions (`--rounds` rounds, think times of mean `--think-s`) arriving at `--spec-low-x`
   times the lower of the two (`--spec-max-session-rate` caps it only when given), reported as
   `offered_x_capacity` (with `offered_x_cloud_capacity` and `bottleneck`): once with speculation on, once
   off. The paper's reference, the same sessions in edge-only mode (every round a one-shot edge image),
   runs interleaved with each: one Poisson schedule of twice the sessions at that rate, whose arrivals
   alternate between a DiffusionX session and the edge-only run of the same session (same prompts, seeds
   and think times), so that both are measured in the same seconds under the same load: run one after
   the other, they would be a minute apart, and a shared machine's speed drifts by as much as the ratio's
   margin over a minute; alternated, drift reaches both alike (docs/results.md, Speculation). The
   DiffusionX arrivals are the same for "on" and "off"; `edge_only_session_latency_s_mean` is the
   reference beside "on" (`edge_only_beside_off_...` beside "off"). Each application first serves the
   same kind of schedule of other sessions, unmeasured (rows `spec-warm-on`, `-off`): a fresh
   application's first loaded run is slower than the ones after it (a local application is started afresh
   after step 1, whose sessions' speculations, bypassed by their finalizes, would otherwise expire in a
   measured run and count as its wasted work). Each low-load run starts a few think times
   (`SETTLE_THINK_TIMES`, at most `SETTLE_S`) after the run before it. Why not the cloud's capacity alone:
   a finalize at the predicted strength is a few cloud steps, so the sessions that load the cloud tier to
   0.3x hold the edge tier (and, where the tiers share a machine's cores, the cloud's cores too) far
   beyond what it serves, and at a low load requests do not batch, so `1 / S`, not the batched
   throughput, is what the application serves then.
3. High load. The same sessions with the router's latency target, while finalizes of previews made
   beforehand arrive at `--load-x` times the measured capacity of the router experiment's finalizes (at
   `--finalize-strength`, the same target): on and off. SLO attainment is over every finalize of the run
   (the sessions' and the load's); the other figures are the sessions'.
"On" is the application as configured (the default, `speculation: idle`) and "off" the same with
`speculation: off`, each started afresh when the bench runs the local application (so both start with the
configured replicas, whatever the earlier steps scaled); against `--url` the off
runs send `"speculation": "off"` on each refine (the server still speculates, nothing uses it). The arm
that runs first is "on" (`--speculation-first off` swaps them: a difference that follows the order, not
the arm, is the machine's drift).

Per run: `finalize_latency_s_p50`, `_p95`, `session_latency_s_mean`, `slo_attainment`, `quality`,
`cloud_unet_calls` (per session: every response's cloud calls, a speculation's answer counted once, plus
the speculative calls wasted) and `wasted_cloud_unet_calls` (per session, from `/v1/stats`), plus
`speculative` (finalizes by hit | promoted | miss | off), and `cloud_replica_s` (the live cloud
replicas, the more of the run's start and end, x its wall time). Across the runs, with 95% intervals
(`clients.uncertainty`): `low_load.session_latency_x_edge_only` (the DiffusionX sessions with speculation
over their interleaved edge-only runs, paired by session) and `high_load.slo_attainment_on_minus_off`. A
run of the default size cannot resolve a few percent either way: its interval says how far to trust it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np

from clients import loadgen_rows
from clients.capacity import Capacity
from clients.loadgen import LoadgenConfig, run_loadgen, shapes_judge
from clients.uncertainty import paired_ratio, proportion_difference
from clients.workload import poisson_arrivals

UNLOADED = 6  # sessions one at a time for the cloud steps of a session's finalize
UNLOADED_GAP_X = 2.0  # their arrivals this many times a session's mean think time apart
MEASURE_SEED_OFFSET = 1000  # the capacity measurements' sessions: other prompts and seeds
WARM_SEED_OFFSET = 2000  # the warm-up sessions before each application's low-load run: other prompts
# before each low-load run, this many mean think times (at most SETTLE_S): the speculations of the run
# before it, each meant to finish within a think time, finish meanwhile
SETTLE_THINK_TIMES = 5.0
SETTLE_S = 5.0
FIELDS = (
    "finalize_latency_s_p50",
    "finalize_latency_s_p95",
    "session_latency_s_mean",
    "slo_attainment",
    "quality",
    "cloud_unet_calls",
    "wasted_cloud_unet_calls",
    "cloud_replica_s",
)


def loadgen_config(
    url: str, workload: str, arrivals: list[float], settings: argparse.Namespace, **extra: Any
) -> LoadgenConfig:
    """The load generator's settings for one run of `bench compare` (this step's and the others')."""
    return LoadgenConfig(
        url=url,
        workload=workload,
        arrivals=arrivals,
        duration_s=(arrivals[-1] if arrivals else 0.0) + 1.0,
        max_requests=10_000,
        drain_s=settings.drain_s,
        rounds=settings.rounds,
        think_s=settings.think_s,
        num_inference_steps=settings.steps,
        preview_pool=settings.preview_pool,
        seed=settings.seed,
        timeout_s=settings.timeout_s,
        progress=not settings.no_progress,
        **extra,
    )


def _stats(url: str) -> tuple[int, int]:
    """(speculative UNet calls wasted so far, live cloud replicas) from `/v1/stats`."""
    stats = httpx.get(f"{url}/v1/stats", timeout=30.0).json()
    wasted = int(((stats.get("speculation") or {}).get("unet_calls") or {}).get("wasted", 0))
    replicas = int(((stats.get("tiers") or {}).get("cloud") or {}).get("replicas", 0))
    return wasted, replicas


@dataclass
class Together:
    rows: list[list[dict]]  # per config
    wasted: int  # speculative UNet calls wasted during the run
    cloud_replica_s: float  # live cloud replicas (the more of start and end) x the run's wall time


def run_together(url: str, configs: list[LoadgenConfig], quality: bool) -> Together:
    """Runs the loadgen configs at once: their rows, the speculative UNet calls wasted meanwhile, and the
    cloud replica-seconds the run held."""
    judge = shapes_judge() if quality else None
    wasted_before, replicas = _stats(url)
    start = time.perf_counter()

    async def run() -> list[list[dict]]:
        outcomes = await asyncio.gather(*(run_loadgen(config, judge=judge) for config in configs))
        return [rows for rows, _ in outcomes]

    rows = asyncio.run(run())
    seconds = time.perf_counter() - start
    wasted_after, replicas_after = _stats(url)
    return Together(rows, wasted_after - wasted_before, round(max(replicas, replicas_after) * seconds, 1))


def figures(
    session_rows: list[dict[str, Any]],
    all_rows: list[dict[str, Any]],
    run: Together,
    target_ms: float | None,
    summarize: Callable[[list[dict[str, Any]], float | None], dict[str, Any]],
) -> dict[str, Any]:
    """The run's figures (module docstring): session figures from the sessions' rows, SLO attainment
    over every finalize of the run."""
    wasted = run.wasted
    sessions = summarize(session_rows, target_ms)
    slo = summarize(all_rows, target_ms)["slo_attainment"]
    count = max(1, sessions["sessions"])
    cloud = sessions["cloud_unet_calls"]
    finalizes = [row for row in session_rows if row["kind"] == "finalize"]
    return {
        "finalize_latency_s_p50": sessions["finalize_latency_s_p50"],
        "finalize_latency_s_p95": sessions["finalize_latency_s_p95"],
        "session_latency_s_mean": sessions["session_latency_s_mean"],
        "slo_attainment": slo,
        "quality": sessions["quality"],
        "cloud_unet_calls": None if cloud is None else round(cloud + wasted / count, 4),
        "wasted_cloud_unet_calls": round(wasted / count, 4),
        "cloud_replica_s": run.cloud_replica_s,
        "speculative": dict(Counter(str(row.get("speculative") or "none") for row in finalizes)),
        "sessions": sessions["sessions"],
        "errors": sessions["errors"],
    }


def run_speculation(
    url: str,
    settings: argparse.Namespace,
    summarize: Callable[[list[dict[str, Any]], float | None], dict[str, Any]],
    capacity: Capacity,
    target_ms: float,
    restart: Callable[[dict[str, Any]], str] | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Steps 1-3 of the module docstring; the summary's `speculation` entry and the runs' rows.
    `target_ms` is the router experiment's latency target, `capacity` the cloud tier's, measured by
    `bench compare`'s capacity run."""
    runs: dict[str, list[dict[str, Any]]] = {}
    off_extra: dict[str, Any] = {"speculation": "off"}
    if restart is not None:
        # a fresh application for "on" as for "off": the steps before this one may have scaled the cloud
        # tier up (the embedded config autoscales it, 1-2 replicas), and "on" would run with more replicas
        url = restart({})
        off_extra = {}
    urls = {"on": url, "off": url}  # `url` serves the default, `speculation: idle`
    # 1. a session's cloud steps, from sessions one at a time (speculation off: the finalize's steps are
    # those of its predicted strength) and the sessions per second the application serves unbatched
    # (other prompts than the measured sessions': the speculations these previews leave behind must not
    # answer the measured sessions' finalizes)
    other = settings.seed + MEASURE_SEED_OFFSET
    gaps = [settings.rounds * settings.think_s * UNLOADED_GAP_X * i for i in range(UNLOADED)]
    unloaded = loadgen_config(urls["on"], "sessions", gaps, settings, speculation="off")
    [runs["spec-unloaded"]] = run_together(urls["on"], [replace(unloaded, seed=other)], False).rows
    steps = finalize_steps(runs["spec-unloaded"])
    session_finalizes_per_s = capacity.at(steps)
    # sessions per second the application serves one request at a time: 1 / a lone session's summed latency
    session_s = summarize(runs["spec-unloaded"], None)["session_latency_s_mean"]
    if not session_s:
        raise RuntimeError(f"no unloaded session succeeded: {runs['spec-unloaded'][:1]}")
    session_capacity = 1.0 / session_s
    bottleneck = min(session_finalizes_per_s, session_capacity)
    rate = settings.spec_low_x * bottleneck
    if settings.spec_max_session_rate is not None:
        rate = min(rate, settings.spec_max_session_rate)
    sessions = poisson_arrivals(rate, 3600.0, settings.sessions, random.Random(settings.seed + 7))
    diffusionx_arrivals, edge_arrivals = alternating_arrivals(
        rate, settings.sessions, random.Random(settings.seed + 9)
    )
    print(
        f"speculation: a session's finalize takes {steps:.1f} cloud steps (cloud capacity "
        f"{session_finalizes_per_s:.2f} finalizes/s); the application serves {session_capacity:.2f} "
        f"sessions/s unbatched; low load: "
        f"{settings.sessions} sessions and their edge-only runs alternating at {rate:.2f}/s "
        f"({rate / bottleneck:.2f}x the lower)",
        flush=True,
    )
    # 1b. the high-load finalizes: the router experiment's (strength, target) at load_x its capacity
    load_rate = settings.load_x * capacity.per_s
    load_arrivals = poisson_arrivals(
        load_rate, settings.load_s, settings.max_finalizes, random.Random(settings.seed + 8)
    )
    order = ("on", "off") if settings.speculation_first == "on" else ("off", "on")
    if restart is not None and order[0] == "on":
        # the server speculated on step 1's sessions' previews, and their finalizes bypassed it: those
        # speculations would expire a TTL later, in whichever run is then measured, as its wasted work
        # (an "off" arm first restarts below)
        urls["on"] = urls["off"] = restart({})
    summary: dict[str, Any] = {
        "low_load": {
            "offered_x_capacity": round(rate / bottleneck, 4),
            "offered_x_cloud_capacity": round(rate / session_finalizes_per_s, 4),
            "bottleneck": "cloud" if session_finalizes_per_s <= session_capacity else "sessions",
        },
        "high_load": {
            "offered_x_capacity": settings.load_x,
            "latency_target_ms": target_ms,
            "finalize_strength": settings.finalize_strength,
        },
        "session_finalize_cloud_steps": round(steps, 2),
        "capacity_finalizes_per_s": round(session_finalizes_per_s, 4),
        "session_capacity_per_s": round(session_capacity, 4),
    }
    settle_s = min(SETTLE_S, SETTLE_THINK_TIMES * settings.think_s)
    for index, state in enumerate(order):
        if restart is not None and (state == "off" or index > 0):
            urls[state] = restart({} if state == "on" else {"speculation": "off"})
        here = urls[state]
        extra = {} if state == "on" else off_extra
        # 2. low load: DiffusionX sessions and the same sessions edge only (one-shot edge images: nothing
        # to speculate on), alternating in one schedule, after the same kind of schedule of other
        # sessions unmeasured (a fresh application's first loaded run is slower than the ones after it)
        low_config = loadgen_config(here, "sessions", diffusionx_arrivals, settings, **extra)
        edge_config = loadgen_config(here, "sessions", edge_arrivals, settings, mode="edge")
        warm_seed = settings.seed + WARM_SEED_OFFSET
        warm = [replace(config, seed=warm_seed) for config in (low_config, edge_config)]
        runs[f"spec-warm-{state}"], runs[f"spec-warm-edge-{state}"] = run_together(here, warm, False).rows
        time.sleep(settle_s)
        low = run_together(here, [low_config, edge_config], settings.quality)
        rows, edge_rows = low.rows
        runs[f"spec-low-{state}"] = rows
        runs[f"spec-low-edge-{state}"] = edge_rows
        summary["low_load"][state] = figures(rows, rows, low, target_ms, summarize)
        edge_only_s = summarize(edge_rows, None)["session_latency_s_mean"]
        summary["low_load"][f"edge_only_beside_{state}_session_latency_s_mean"] = edge_only_s
        if state == "on":  # the reference: measured beside the sessions with speculation
            summary["low_load"]["edge_only_session_latency_s_mean"] = edge_only_s
        # 3. high load: the same sessions with the target, beside finalizes at load_x capacity
        session_config = loadgen_config(
            here, "sessions", sessions, settings, latency_target_ms=target_ms, **extra
        )
        load_config = loadgen_config(
            here,
            "finalize",
            load_arrivals,
            settings,
            latency_target_ms=target_ms,
            finalize_strength=settings.finalize_strength,
            speculation="off",
        )
        high = run_together(here, [session_config, load_config], settings.quality)
        session_rows, load_rows = high.rows
        runs[f"spec-high-{state}"] = session_rows
        runs[f"spec-high-{state}-load"] = load_rows
        summary["high_load"][state] = figures(
            session_rows, session_rows + load_rows, high, target_ms, summarize
        )
    summary["low_load"]["session_latency_x_edge_only"] = session_ratio(
        runs["spec-low-on"], runs["spec-low-edge-on"]
    )
    summary["high_load"]["slo_attainment_on_minus_off"] = slo_difference(
        [runs[f"spec-high-{state}"] + runs[f"spec-high-{state}-load"] for state in ("on", "off")], target_ms
    )
    return summary, runs


def session_ratio(sessions: list[dict[str, Any]], edge_only: list[dict[str, Any]]) -> dict[str, Any] | None:
    """DiffusionX sessions' mean latency over the same sessions' edge-only runs, paired by session, with
    its 95% interval (`clients.uncertainty.paired_ratio`); None with fewer than two complete pairs."""
    ours, theirs = loadgen_rows.session_latencies_s(sessions), loadgen_rows.session_latencies_s(edge_only)
    paired = sorted(set(ours) & set(theirs))
    if len(paired) < 2:
        return None
    return paired_ratio([ours[key] for key in paired], [theirs[key] for key in paired])


def slo_difference(runs: list[list[dict[str, Any]]], target_ms: float) -> dict[str, Any] | None:
    """SLO attainment of the first run minus the second's, over their finalizes, with its 95% interval
    (`clients.uncertainty.proportion_difference`); None when either sent no finalize."""
    counts = [loadgen_rows.finalizes_within(rows, target_ms) for rows in runs]
    if any(sent == 0 for _, sent in counts):
        return None
    return proportion_difference(*(count for pair in counts for count in pair))


def alternating_arrivals(rate: float, sessions: int, rng: random.Random) -> tuple[list[float], list[float]]:
    """The low-load schedule: `2 * sessions` Poisson arrivals at `rate` per second, alternately a
    DiffusionX session's and the same session's edge-only run (module docstring, step 2)."""
    arrivals = poisson_arrivals(rate, 3600.0, 2 * sessions, rng)
    if len(arrivals) < 2 * sessions:
        raise ValueError(f"{sessions} sessions at {rate}/s do not arrive within an hour: raise the rate")
    return arrivals[0::2], arrivals[1::2]


def finalize_steps(rows: list[dict[str, Any]]) -> float:
    """Mean cloud steps of the 2xx finalizes of unloaded sessions."""
    ok = loadgen_rows.ok_finalizes(rows)
    if not ok:
        raise RuntimeError(f"no unloaded finalize succeeded: {rows[:1]}")
    return float(np.mean([max(1.0, float(r["cloud_unet_calls"])) for r in ok]))


def plot(runs: dict[str, list[dict[str, Any]]], out: Any) -> None:
    """CDF of the sessions' finalize latency, speculation on against off, at each load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, load in zip(axes, ("low", "high"), strict=True):
        for state in ("on", "off"):
            rows = runs.get(f"spec-{load}-{state}", [])
            values = np.sort(loadgen_rows.finalize_latencies_s(rows))
            if values.size:
                axis.plot(values, np.arange(1, values.size + 1) / values.size, label=f"speculation {state}")
        axis.set(title=f"session finalize latency, {load} load", xlabel="seconds", ylabel="CDF")
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "speculation_cdf.png", dpi=110)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speculation-only", action="store_true", help="run only the speculation experiment (step 5)"
    )
    parser.add_argument(
        "--speculation-first",
        choices=("on", "off"),
        default="on",
        help="speculation: which arm runs first (on); the arms run one after the other, so a machine "
        "whose speed drifts reaches the second differently: run both orders to see how much",
    )
    parser.add_argument(
        "--spec-low-x", type=float, default=0.3, help="speculation: low-load sessions, x capacity (0.3)"
    )
    parser.add_argument(
        "--spec-max-session-rate",
        type=float,
        default=None,
        help="speculation: cap on the low-load session rate per second (default: none, so low load is "
        "--spec-low-x of the cloud tier's capacity; a cap makes offered_x_capacity lower)",
    )
