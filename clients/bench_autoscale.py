"""`diffusionx bench autoscale [--quick] --out DIR`: three cloud autoscaling policies on the same session
ramp, on Ray's local autoscaling cluster with replicas that keep a GPU's time.

1. For each policy (`--policies`, default `default,work,ahead`) start a fresh
   `ray.cluster_utils.AutoscalingCluster` (`deployments.autoscaling_cluster`): a head and fake `cloud` /
   `edge` node types carrying the tier resources of `serve_config_autoscale.yaml`, each node arriving
   `--node-start-s` after the autoscaler asks for it (a cloud's provisioning and boot). The application's
   models are GPU-timed (`sd15-gpu-timed`, `tiny-sd-gpu-timed`: each denoising step waits `t(b)` of a GPU
   profile, each replica start its load time; `--gpu-profile`, default the shipped A100 profile), so a
   replica adds capacity as a GPU would. Policies: `default` (Serve's request-count policy), `work`
   (`QueuedStepsPolicy`, the config's), `ahead` (`AheadPolicy`: the work held plus the finalizes the
   previewing sessions will bring; its priors, used until the ingress has measured whole cohorts, are what
   the first policy's run of the same workload measured, `session_priors`, as a deployment starts from its
   earlier traffic; its horizon is this cluster's time from a decision to a serving replica,
   `ahead_horizon_s`); same bounds and upscale delay, and for `ahead` a downscale delay as short as the
   upscale delay, since its forecast holds the replicas the horizon needs (`cloud_autoscaling`).
2. On the first cluster, before its ramp, size the experiment from one cloud replica: a few finalizes one
   at a time give the steps of a finalize and the unloaded latency; the replica's published service model
   (`t(b)`, batch capacity `B`) gives its capacity, `B / (steps * t(B))` finalizes per second (as `bench
   compare`). The ramp peaks at `--peak-x` times that capacity (sessions per second; every session
   finalizes), the latency target (SLO) is `--slo-x` times the unloaded latency, and the cloud replicas the
   peak needs are `ceil(peak / capacity)`. The edge tier is not what is measured: it is held (min = max
   replicas) at what the peak's previews need at `EDGE_UTILIZATION` of its full-batch throughput on the GPU
   profile (`edge_replicas_for`), on every cluster before its ramp, so previews never hold sessions back.
3. Replay the ramped session workload (`clients.loadgen`: arrivals rise linearly to the peak, hold, fall;
   each session previews `--rounds` times with think times, then finalizes at `--finalize-strength`) and
   sample every `--sample-s` seconds the running replicas per tier, the alive nodes and the cloud tier's
   queued steps; after the last arrival keep sampling `--cooldown-s` to watch the scale-down.
4. Write `DIR/autoscale.json` (`setup` with the sizing, `policies` {name: timeline, summary,
   nodes_by_type}, `comparison`), `timeline.csv` (every sample of every policy), `requests_POLICY.csv`
   (one row per request), `arrivals_trace.csv` (the session arrivals, for a real cluster) and
   `autoscale.png`.

Each summary holds the peak offered load, cloud replicas and nodes min/max/end, scale-up and scale-down
times, replica- and node-seconds (over one span for every policy, `measured_span_s`), the replica-seconds
of replicas that exactly follow the finalizes that arrived (`exact_cloud_replica_s`), finalize latency,
`slo_attainment` (finalizes that ended 200 within the SLO, of all finalizes sent) and `time_to_capacity_s`
(from the start of the load's rise to the first sample with the replicas the peak needs running).
`offered_rps` is the rate of requests sent (all kinds) and the p95 is over finalizes that ended, both in
the `--window-s` before each sample. `DIR` defaults to
`bench_results/autoscale/`.

Ray: each policy's cluster is this bench's own (a head on port 6379 and fake nodes); it refuses to start
when another Ray cluster listens there, and stopping ends only the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from clients.loadgen import LoadgenConfig, run_loadgen
from clients.workload import poisson_arrivals, ramp_arrivals
from diffusionx.experiments.outputs import bench_results_dir

POLICIES = ("default", "work", "ahead")
AHEAD_POLICY = "diffusionx.policy.ahead:AheadPolicy"
UNLOADED_FINALIZES = 5  # one at a time, UNLOADED_GAP_S apart: steps and unloaded latency of a finalize
UNLOADED_GAP_S = 2.0
DEFAULT_OUT = bench_results_dir("autoscale")


@dataclass
class Ramp:
    """Session arrivals: rate 0 -> peak over `up_s`, `hold_s` at peak, peak -> 0 over `down_s`."""

    peak_rate: float  # sessions per second
    up_s: float
    hold_s: float
    down_s: float

    @property
    def duration_s(self) -> float:
        return self.up_s + self.hold_s + self.down_s

    def arrivals(self, seed: int) -> list[float]:
        rng = random.Random(seed)
        cap = 10**6
        up = ramp_arrivals(0.0, self.peak_rate, self.up_s, cap, rng)
        hold = [self.up_s + t for t in poisson_arrivals(self.peak_rate, self.hold_s, cap, rng)]
        down_start = self.up_s + self.hold_s
        down = [down_start + t for t in ramp_arrivals(self.peak_rate, 0.0, self.down_s, cap, rng)]
        return up + hold + down


QUICK = Ramp(peak_rate=0.0, up_s=30.0, hold_s=60.0, down_s=20.0)  # peak_rate: sized from the capacity
FULL = Ramp(peak_rate=0.0, up_s=120.0, hold_s=120.0, down_s=90.0)


# -- the timeline and its figures (pure; unit-tested) -----------------------------------------------------
def p95(values: list[float]) -> float | None:
    return round(float(np.percentile(values, 95)), 3) if values else None


def build_timeline(samples: list[dict[str, Any]], rows: list[dict[str, Any]], window_s: float) -> list[dict]:
    """One entry per sample: the cluster as sampled, the offered rate and the finalize p95 from the rows
    (loadgen CSV rows: `arrival_s`, `kind`, `status`, `e2e_ms`) in the `window_s` before it."""
    arrivals = np.array(sorted(float(r["arrival_s"]) for r in rows))
    finalizes = [
        (float(r["arrival_s"]) + float(r["e2e_ms"]) / 1000.0, float(r["e2e_ms"]) / 1000.0)
        for r in rows
        if r["kind"] == "finalize" and r["status"] == 200
    ]
    timeline = []
    for sample in samples:
        t = sample["t_s"]
        start = max(0.0, t - window_s)
        span = t - start
        sent = int(np.sum((arrivals > start) & (arrivals <= t))) if len(arrivals) else 0
        ended = [latency for end, latency in finalizes if start < end <= t]
        timeline.append(
            {
                "t_s": round(t, 2),
                "offered_rps": round(sent / span, 3) if span > 0 else 0.0,
                "replicas": dict(sample["replicas"]),
                "asked": dict(sample.get("asked", {})),
                "nodes": sample["nodes"],
                "queued_steps": sample["queued_steps"],
                "finalize_latency_s_p95": p95(ended),
            }
        )
    return timeline


def _integral(times: list[float], values: list[float], until_s: float | None = None) -> float:
    """Seconds x value, each sample's value held until the next sample; with `until_s`, over [first
    sample, until_s]: the last value held to it, samples after it left out."""
    if until_s is not None:
        kept = [(t, v) for t, v in zip(times, values, strict=True) if t <= until_s]
        times, values = [t for t, _ in kept] + [until_s], [v for _, v in kept] + [0.0]
    return float(sum(v * (b - a) for a, b, v in zip(times, times[1:], values, strict=False)))


def _back_to(times: list[float], values: list[float], level: float, after_s: float) -> float | None:
    """The first time >= after_s from which `values` stay at or below `level` to the end."""
    found = None
    for t, v in zip(times, values, strict=True):
        if t < after_s:
            continue
        found = (t if found is None else found) if v <= level else None
    return found


def exact_replica_s(
    rows: list[dict[str, Any]], capacity_per_replica: float, span_s: float, window_s: float = 20.0
) -> float:
    """Cloud replica-seconds over [0, `span_s`] of replicas that exactly follow the finalizes that arrived:
    each second, the finalizes sent in the `window_s` around it over one replica's capacity, rounded up, at
    least 1; up the instant they are needed and gone the instant they are not (no provisioning time, no
    downscale delay, no headroom). No policy can do this; it is what a run's replica-seconds are read
    against, since a policy that did not serve the wave (shed it, or let it queue) used fewer."""
    if capacity_per_replica <= 0 or window_s <= 0:
        raise ValueError(f"capacity_per_replica={capacity_per_replica} and window_s={window_s} must be > 0")
    arrivals = np.sort([float(r["arrival_s"]) for r in rows if r["kind"] == "finalize"])
    seconds = np.arange(math.ceil(span_s))
    half = window_s / 2
    sent = np.searchsorted(arrivals, seconds + half) - np.searchsorted(arrivals, seconds - half)
    needed = np.maximum(1, np.ceil(sent / window_s / capacity_per_replica - 1e-9))
    return float(needed.sum())


def slo_attainment(rows: list[dict[str, Any]], slo_s: float) -> float | None:
    """Share of the finalizes sent that ended 200 within `slo_s` (refused or failed ones miss)."""
    finals = [r for r in rows if r["kind"] == "finalize"]
    if not finals:
        return None
    met = sum(1 for r in finals if r["status"] == 200 and float(r["e2e_ms"]) / 1000.0 <= slo_s)
    return round(met / len(finals), 4)


def back_at_start(samples: list[dict[str, Any]], settle: int = 3) -> bool:
    """Whether the cloud replicas are back where they started and the nodes at their fewest, for the last
    `settle` samples (after having left it): the scale-down is over, the cool-down can end before
    `--cooldown-s`. The nodes' fewest, not their first: an idle node of the start-up (the sizing's
    restart) may still be leaving when the load begins."""
    if len(samples) <= settle:
        return False
    start = (samples[0]["replicas"]["cloud"], min(s["nodes"] for s in samples))
    moved = any((s["replicas"]["cloud"], s["nodes"]) != start for s in samples)
    return moved and all((s["replicas"]["cloud"], s["nodes"]) == start for s in samples[-settle:])


def measured_span_s(ramp: Ramp, args: argparse.Namespace) -> float:
    """The span every policy's replica- and node-seconds are counted over, from the load's start: the
    arrivals, the sessions' drain and the whole cool-down, the longest a run samples. A run that ends
    sooner (back at its start) is counted at its last sample's replicas to the end of the span, so a
    policy is never charged for the seconds it took to settle, nor credited for stopping early."""
    return ramp.duration_s + args.drain_s + args.cooldown_s


def time_to_capacity(timeline: list[dict], needed: int) -> float | None:
    """Seconds from the start of the load's rise (t = 0) to the first sample with `needed` cloud replicas."""
    return next((e["t_s"] for e in timeline if e["replicas"]["cloud"] >= needed), None)


def summarize(
    timeline: list[dict],
    rows: list[dict[str, Any]],
    ramp: Ramp,
    slo_s: float | None = None,
    needed_cloud: int | None = None,
    span_s: float | None = None,
    capacity_per_replica: float | None = None,
) -> dict[str, Any]:
    """The figures of one run: peak offered load, cloud replicas and nodes min -> max -> end, time to
    scale up (load start to the first added cloud replica, and to the peak) and down (load falling to
    back at the minimum), replica- and node-seconds, finalize latency; with the SLO and the replicas the
    peak needs, SLO attainment and time to capacity; with one replica's capacity, `exact_replica_s`.
    Replica- and node-seconds are over [0, `span_s`] when given (`measured_span_s`: the same span for
    every policy, whenever its run stopped sampling), else over the samples."""
    times = [e["t_s"] for e in timeline]
    cloud = [e["replicas"]["cloud"] for e in timeline]
    nodes = [e["nodes"] for e in timeline]
    first_up = next((t for t, c in zip(times, cloud, strict=True) if c > cloud[0]), None)
    at_peak = next((t for t, c in zip(times, cloud, strict=True) if c == max(cloud)), None)
    down_start = ramp.up_s + ramp.hold_s
    cloud_down = _back_to(times, cloud, min(cloud), down_start) if max(cloud) > min(cloud) else None
    nodes_down = _back_to(times, nodes, min(nodes), down_start) if max(nodes) > min(nodes) else None
    finals = [float(r["e2e_ms"]) / 1000.0 for r in rows if r["kind"] == "finalize" and r["status"] == 200]
    return {
        "peak_offered_rps": max((e["offered_rps"] for e in timeline), default=0.0),
        "cloud_replicas": {"min": min(cloud), "max": max(cloud), "end": cloud[-1]},
        "nodes": {"min": min(nodes), "max": max(nodes), "end": nodes[-1]},
        "scale_up_s": {"first_cloud_replica": first_up, "cloud_at_peak": at_peak},
        "scale_down_s": {
            "cloud_back_to_min": None if cloud_down is None else round(cloud_down - down_start, 1),
            "nodes_back_to_min": None if nodes_down is None else round(nodes_down - down_start, 1),
        },
        "cloud_replica_s": round(_integral(times, cloud, span_s), 1),
        "tier_replica_s": round(_integral(times, [sum(e["replicas"].values()) for e in timeline], span_s), 1),
        "node_s": round(_integral(times, nodes, span_s), 1),
        "exact_cloud_replica_s": (
            None
            if capacity_per_replica is None or span_s is None
            else round(exact_replica_s(rows, capacity_per_replica, span_s), 1)
        ),
        "finalize_latency_s": {
            "n": len(finals),
            "p50": round(float(np.median(finals)), 3) if finals else None,
            "p95": p95(finals),
        },
        "requests": len(rows),
        "errors": sum(1 for r in rows if r["status"] != 200),
        "slo_attainment": None if slo_s is None else slo_attainment(rows, slo_s),
        "time_to_capacity_s": None if needed_cloud is None else time_to_capacity(timeline, needed_cloud),
    }


# -- the run ----------------------------------------------------------------------------------------------
async def _sample_loop(url: str, start: float, stop: asyncio.Event, every_s: float, out: list) -> None:
    from deployments.autoscaling_cluster import sample_cluster

    async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
        while not stop.is_set():
            t = time.perf_counter() - start
            cluster = await asyncio.to_thread(sample_cluster)
            try:
                cloud = (await http.get("/v1/stats")).json()["tiers"]["cloud"]
                queued_steps = int(cloud.get("queued_steps", 0))
            except (httpx.HTTPError, KeyError, ValueError):
                queued_steps = None
            out.append({**asdict(cluster), "t_s": t, "queued_steps": queued_steps})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


def _loadgen_config(
    url: str, args: argparse.Namespace, workload: str, arrivals: list[float], duration_s: float
):
    return LoadgenConfig(
        url=url,
        workload=workload,
        arrivals=arrivals,
        duration_s=duration_s,
        max_requests=100_000,
        drain_s=args.drain_s,
        rounds=args.rounds,
        think_s=args.think_s,
        num_inference_steps=args.steps,
        finalize_strength=args.finalize_strength,
        preview_pool=UNLOADED_FINALIZES,
        seed=args.seed,
        timeout_s=args.timeout_s,
        progress=False,
    )


async def _run_once(url: str, args: argparse.Namespace, ramp: Ramp, arrivals: list[float]) -> tuple:
    samples: list[dict] = []
    stop = asyncio.Event()
    start = time.perf_counter()
    sampler = asyncio.create_task(_sample_loop(url, start, stop, args.sample_s, samples))
    rows, _ = await run_loadgen(_loadgen_config(url, args, "sessions", arrivals, ramp.duration_s))
    load_end = time.perf_counter() - start
    while time.perf_counter() - start < load_end + args.cooldown_s and not back_at_start(samples):
        await asyncio.sleep(1.0)
    stop.set()
    await sampler
    return rows, samples


@dataclass
class Sizing:
    """The experiment sized from one cloud replica (module docstring, step 2)."""

    finalize_steps: float
    unloaded_latency_s: float
    capacity_per_replica: float  # finalizes per second at full batches
    peak_rate: float  # sessions per second at the peak
    slo_s: float
    needed_cloud_replicas: int
    edge_replicas: int  # fixed for the run: the edge tier is not what is measured


EDGE_UTILIZATION = 0.5  # of the edge's full-batch throughput at the peak: previews never wait on the edge


def edge_replicas_for(peak_rate: float, rounds: int, preview_steps: int, step_s: float, batch: int) -> int:
    """Edge replicas that serve the peak's previews at `EDGE_UTILIZATION`: `peak_rate` sessions per second
    each previewing `rounds` times (Little's law at the hold), `preview_steps` steps per preview, a step of
    `batch` previews taking `step_s` (the edge's t(B))."""
    if batch < 1 or step_s <= 0:
        raise ValueError(f"batch={batch} and step_s={step_s} must be >= 1 and > 0")
    busy = peak_rate * rounds * preview_steps * step_s / batch  # edge replica-seconds per second
    return max(1, math.ceil(busy / EDGE_UTILIZATION - 1e-9))


def edge_step(config_path: Path) -> tuple[int, int, float]:
    """(preview steps, full batch B, t(B)) of the config's edge model on the GPU profile it waits."""
    import yaml

    from diffusionx.models.gpu_timed import load_profile
    from diffusionx.models.registry import get_spec

    args = yaml.safe_load(Path(config_path).read_text())["applications"][0]["args"]
    spec = get_spec(args["edge_model"])
    batch = int(args["edge_max_batch_size"])
    step_s = load_profile().role(spec.gpu_timed).step_s(batch)
    return int(spec.preview_steps or spec.default_steps), batch, step_s


def measure_sizing(url: str, args: argparse.Namespace) -> Sizing:
    from clients.capacity import capacity_per_s, cloud_service
    from deployments.local import AUTOSCALE_CONFIG

    gaps = [UNLOADED_GAP_S * i for i in range(UNLOADED_FINALIZES)]
    config = _loadgen_config(url, args, "finalize", gaps, gaps[-1] + 1.0)
    rows, _ = asyncio.run(run_loadgen(config))
    ok = [r for r in rows if r["kind"] == "finalize" and r["status"] == 200]
    if not ok:
        raise RuntimeError(f"no unloaded finalize succeeded: cannot size the ramp ({rows[:1]})")
    steps = float(np.mean([float(r["cloud_unet_calls"]) for r in ok]))
    cloud = cloud_service(url)
    replicas = max(1, len(cloud.get("per_replica") or []))
    capacity = capacity_per_s(cloud, steps) / replicas
    unloaded_s = float(np.median([float(r["e2e_ms"]) for r in ok])) / 1000.0
    peak = args.peak_rate or args.peak_x * capacity
    preview_steps, edge_batch, edge_step_s = edge_step(AUTOSCALE_CONFIG)
    return Sizing(
        finalize_steps=round(steps, 2),
        unloaded_latency_s=round(unloaded_s, 3),
        capacity_per_replica=round(capacity, 4),
        peak_rate=round(peak, 4),
        slo_s=round(args.slo_x * unloaded_s, 3),
        needed_cloud_replicas=max(1, math.ceil(peak / capacity - 1e-9)),
        edge_replicas=edge_replicas_for(peak, args.rounds, preview_steps, edge_step_s, edge_batch),
    )


def _config_app() -> dict[str, Any]:
    """The application of `serve_config_autoscale.yaml`, as written."""
    import yaml

    from deployments.local import AUTOSCALE_CONFIG

    app: dict[str, Any] = yaml.safe_load(Path(AUTOSCALE_CONFIG).read_text())["applications"][0]
    return app


def _autoscaling_config(deployment: str, app: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of `deployment`'s autoscaling_config in the experiment's config (`app`: one already read)."""
    found = next(d for d in (app or _config_app())["deployments"] if d["name"] == deployment)
    return dict(found["autoscaling_config"])


def cloud_autoscaling(policy: str, ahead_kwargs: dict[str, float] | None = None) -> dict[str, Any]:
    """The cloud tier's autoscaling_config for `policy`: the config's (work), the same without the custom
    policy (default: Serve's on target_ongoing_requests), or the config's kwargs with `AheadPolicy` and
    `ahead_kwargs` (its priors and horizon; ahead); same bounds and upscale delay, and for ahead a
    downscale delay equal to the upscale delay (`diffusionx.policy.ahead` says why)."""
    autoscaling = _autoscaling_config("CloudRefiner")
    if policy == "default":
        autoscaling.pop("policy", None)
    elif policy == "ahead":
        kwargs = dict(autoscaling["policy"].get("policy_kwargs", {}))
        kwargs = {**kwargs, **AHEAD_KWARGS, **(ahead_kwargs or {})}
        autoscaling["policy"] = {"policy_function": AHEAD_POLICY, "policy_kwargs": kwargs}
        autoscaling["downscale_delay_s"] = autoscaling["upscale_delay_s"]
    return autoscaling


def edge_autoscaling(replicas: int) -> dict[str, Any]:
    """The edge tier's autoscaling_config held at `replicas` (min = max): the experiment is the cloud's."""
    return {**_autoscaling_config("EdgePreviewer"), "min_replicas": replicas, "max_replicas": replicas}


def _wait_for_edge(replicas: int, timeout_s: float = 180.0) -> None:
    from deployments.autoscaling_cluster import sample_cluster

    deadline = time.monotonic() + timeout_s
    while sample_cluster().replicas["edge"] < replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the edge tier did not reach {replicas} replicas within {timeout_s:.0f} s")
        time.sleep(1.0)


def session_priors(rows: list[dict[str, Any]], finalize_steps: float) -> dict[str, float]:
    """`AheadPolicy`'s priors from an earlier run of the workload (loadgen rows: `session`, `kind`,
    `arrival_s`): the share of sessions that sent a finalize, the mean time from a session's first preview
    to its finalize, and the measured steps of a finalize; {} when that run had no finalize."""
    first: dict[str, float] = {}
    finals: dict[str, float] = {}
    for r in rows:
        session, t = str(r["session"]), float(r["arrival_s"])
        if r["kind"] == "finalize":
            finals[session] = t
        else:
            first[session] = min(t, first.get(session, t))
    leads = [t - first[s] for s, t in finals.items() if s in first]
    if not leads or finalize_steps <= 0:
        return {}
    return {
        "prior_finalize_share": round(len(leads) / len(first), 4),
        "prior_preview_to_finalize_s": round(sum(leads) / len(leads), 2),
        "prior_preview_to_finalize_sd_s": round(float(np.std(leads)), 2),
        "prior_finalize_steps": round(finalize_steps, 2),
    }


AHEAD_KWARGS = {"target_utilization": 0.85}  # of full-batch throughput: batches stay part-full, latency low


def replica_start_s(samples: list[dict[str, Any]], tier: str = "cloud") -> float | None:
    """The longest time from Serve asking for another replica of `tier` to its running (a node's start-up,
    the replica's process and model load), over the scale-ups of a run's samples (`asked` and `replicas`
    per tier): a forecast planned for the typical start-up is late for every slower one (on this host a
    replica's process starts slower while the load runs); None when the run never scaled up."""
    lags = []
    for i in range(1, len(samples)):
        before, now = samples[i - 1]["asked"][tier], samples[i]["asked"][tier]
        for target in range(before + 1, now + 1):  # the (target)th replica asked for at this sample
            running = next((s["t_s"] for s in samples[i:] if s["replicas"][tier] >= target), None)
            if running is not None:
                lags.append(running - samples[i]["t_s"])
    return max(lags) if lags else None


def ahead_horizon_s(start_s: float | None, node_start_s: float) -> float:
    """`AheadPolicy.horizon_s` on this bench's cluster: from the session activity the policy reads to a new
    replica serving. Serve's upscale delay, the metrics' look-back (they are averaged over it) and report
    period, then a replica's start-up as the first run measured it (`replica_start_s`), or without one the
    node's start-up and the model's load on the GPU profile (a lower bound: the replica's process starts
    too)."""
    from diffusionx.models.gpu_timed import load_profile
    from diffusionx.models.registry import get_spec

    app = _config_app()
    cloud = _autoscaling_config("CloudRefiner", app)
    if start_s is None:
        model = get_spec(app["args"]["cloud_model"])
        start_s = node_start_s + load_profile().role(model.gpu_timed).load_s
    lag_s = cloud["look_back_period_s"] + cloud["metrics_interval_s"]
    return round(float(cloud["upscale_delay_s"] + lag_s + start_s), 1)


def run_policy(
    policy: str,
    args: argparse.Namespace,
    ramp: Ramp | None,
    sizing: Sizing | None,
    ahead_kwargs: dict[str, float] | None = None,
) -> tuple:
    """One policy on a fresh cluster: (rows, samples, sizing, ramp); sizes the ramp first when not given."""
    from deployments.autoscaling_cluster import start_cluster, stop_cluster
    from deployments.local import AUTOSCALE_CONFIG, start_local_app

    began = time.monotonic()
    cluster = start_cluster(node_start_delay_s=args.node_start_s)
    try:
        options: dict[str, dict[str, Any]] = {
            "CloudRefiner": {"autoscaling_config": cloud_autoscaling(policy, ahead_kwargs)}
        }
        if sizing is not None:
            options["EdgePreviewer"] = {"autoscaling_config": edge_autoscaling(sizing.edge_replicas)}
        url = start_local_app(AUTOSCALE_CONFIG, port=args.port, deployment_options=options, timeout_s=600.0)
        print(
            f"[{policy}] cluster and application up in {time.monotonic() - began:.0f} s at {url}", flush=True
        )
        if sizing is None:
            sizing = measure_sizing(url, args)
            print(f"[{policy}] sizing: {json.dumps(asdict(sizing))}", flush=True)
            options["EdgePreviewer"] = {"autoscaling_config": edge_autoscaling(sizing.edge_replicas)}
            url = start_local_app(AUTOSCALE_CONFIG, port=args.port, deployment_options=options)
        _wait_for_edge(sizing.edge_replicas)
        if ramp is None:
            base = QUICK if args.quick else FULL
            ramp = Ramp(sizing.peak_rate, base.up_s, base.hold_s, base.down_s)
        arrivals = ramp.arrivals(args.seed)
        print(f"[{policy}] ramp {asdict(ramp)}: {len(arrivals)} sessions ...", flush=True)
        rows, samples = asyncio.run(_run_once(url, args, ramp, arrivals))
    finally:
        stop_cluster(cluster)
    return rows, samples, sizing, ramp


def plot(results: dict[str, dict], ramp: Ramp, sizing: Sizing, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    styles = {"default": ("C3", "--"), "work": ("C0", "-."), "ahead": ("C2", "-")}
    for policy, result in results.items():
        tl = result["timeline"]
        t = [e["t_s"] for e in tl]
        color, style = styles[policy]
        summary = result["summary"]
        label = (
            f"{policy} (SLO {summary['slo_attainment']:.0%})"
            if summary["slo_attainment"] is not None
            else policy
        )
        axes[0].plot(t, [e["offered_rps"] for e in tl], style, color=color, label=policy)
        axes[1].step(t, [e["replicas"]["cloud"] for e in tl], style, color=color, where="post", label=label)
        axes[2].step(t, [e["nodes"] for e in tl], style, color=color, where="post", label=policy)
        axes[3].plot(
            t, [e["finalize_latency_s_p95"] for e in tl], style, color=color, marker=".", label=policy
        )
    axes[1].axhline(sizing.needed_cloud_replicas, color="0.5", lw=0.8, ls=":", label="needed at the peak")
    axes[3].axhline(sizing.slo_s, color="0.5", lw=0.8, ls=":", label=f"SLO {sizing.slo_s:.1f} s")
    for ax in axes:
        ax.axvspan(ramp.up_s, ramp.up_s + ramp.hold_s, color="0.92", zorder=0)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("offered req/s")
    axes[1].set_ylabel("cloud replicas")
    axes[2].set_ylabel("nodes (with head)")
    axes[3].set_ylabel("finalize p95 (s)")
    axes[3].set_xlabel("seconds from the start of the load (grey: hold at peak)")
    fig.suptitle("diffusionx bench autoscale: cloud policies on GPU-timed replicas")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TIMELINE_COLUMNS = ("policy", "t_s", "offered_rps", "cloud", "edge", "predictor", "nodes", "queued_steps",
                    "finalize_latency_s_p95")  # fmt: skip


def write_timeline_csv(results: dict[str, dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TIMELINE_COLUMNS)
        for policy, result in results.items():
            for e in result["timeline"]:
                replicas = e["replicas"]
                writer.writerow([policy, e["t_s"], e["offered_rps"], replicas["cloud"], replicas["edge"],
                                 replicas["predictor"], e["nodes"], e["queued_steps"],
                                 e["finalize_latency_s_p95"]])  # fmt: skip
    return path


def write_trace(arrivals: list[float], path: Path) -> Path:
    path.write_text("arrival_ms\n" + "".join(f"{t * 1000.0:.1f}\n" for t in arrivals))
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="diffusionx bench autoscale",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
    )
    parser.add_argument("--quick", action="store_true", help="short ramp: 30 s up, 60 s hold, 20 s down")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="cloud policies to run, in order")
    parser.add_argument(
        "--peak-x", type=float, default=2.5, help="peak sessions/s, times one replica's capacity"
    )
    parser.add_argument("--peak-rate", type=float, help="peak sessions per second (instead of --peak-x)")
    parser.add_argument("--slo-x", type=float, default=3.0, help="finalize SLO, times the unloaded latency")
    parser.add_argument("--rounds", type=int, default=4, help="previews per session (default 4)")
    parser.add_argument(
        "--think-s", type=float, default=12.0, help="mean think time between rounds (default 12)"
    )
    parser.add_argument("--steps", type=int, default=50, help="finalize: full-schedule steps (default 50)")
    parser.add_argument(
        "--finalize-strength", type=float, default=0.6, help="finalize strength (default 0.6)"
    )
    parser.add_argument(
        "--node-start-s", type=float, default=15.0, help="a node's start-up delay (default 15)"
    )
    parser.add_argument(
        "--gpu-profile", help="a gpu-bench gpu_bench.json (default: the shipped A100 profile)"
    )
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between samples (default 2)")
    parser.add_argument("--window-s", type=float, default=10.0, help="rate and p95 window (default 10)")
    parser.add_argument("--drain-s", type=float, default=60.0, help="sessions finish within this")
    parser.add_argument(
        "--cooldown-s",
        type=float,
        help="most sampling after the load, less once replicas and nodes are back (quick 75, else 150)",
    )
    parser.add_argument("--timeout-s", type=float, default=120.0, help="client timeout per request")
    parser.add_argument("--seed", type=int, default=0, help="arrivals and session seed (default 0)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the application (default 8000)")
    args = parser.parse_args(argv)
    args.policies = [p for p in args.policies.split(",") if p]
    if not args.policies or any(p not in POLICIES for p in args.policies):
        parser.error(f"--policies {args.policies}: use some of {', '.join(POLICIES)}")
    if args.cooldown_s is None:
        args.cooldown_s = 75.0 if args.quick else 150.0
    return args


def main(argv: list[str] | None = None) -> int:
    from clients.loadgen import write_rows

    args = parse_args(argv)
    # a SIGTERM (timeout, a scheduler) unwinds like Ctrl-C, so each cluster is stopped by its `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.gpu_profile:  # inherited by the head, its raylets and every replica
        from diffusionx.models.gpu_timed import PROFILE_ENV, load_profile

        load_profile(args.gpu_profile)  # a bad file fails here, not in a replica
        os.environ[PROFILE_ENV] = str(Path(args.gpu_profile).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    results: dict[str, dict] = {}
    ramp: Ramp | None = None
    sizing: Sizing | None = None
    ahead_kwargs: dict[str, float] = {}  # the first run's session priors and the cluster's horizon
    start_s: float | None = None  # a cloud replica's start-up, measured in the first run
    for policy in args.policies:
        rows, samples, sizing, ramp = run_policy(policy, args, ramp, sizing, ahead_kwargs)
        if not ahead_kwargs:
            start_s = replica_start_s(samples)
            horizon_s = ahead_horizon_s(start_s, args.node_start_s)
            ahead_kwargs = {**session_priors(rows, sizing.finalize_steps), "horizon_s": horizon_s}
        timeline = build_timeline(samples, rows, args.window_s)
        summary = summarize(
            timeline,
            rows,
            ramp,
            sizing.slo_s,
            sizing.needed_cloud_replicas,
            measured_span_s(ramp, args),
            sizing.capacity_per_replica,
        )
        results[policy] = {
            "timeline": timeline,
            "summary": summary,
            "nodes_by_type": [{"t_s": round(s["t_s"], 2), **s["nodes_by_type"]} for s in samples],
        }
        write_rows(rows, out / f"requests_{policy}.csv")
        print(f"[{policy}] {json.dumps(summary)}", flush=True)
    assert ramp is not None and sizing is not None
    arrivals = ramp.arrivals(args.seed)
    report: dict[str, Any] = {
        "benchmark": "autoscale",
        "setup": {
            "quick": args.quick,
            "ramp": asdict(ramp),
            "sizing": asdict(sizing),
            "sessions": len(arrivals),
            "rounds": args.rounds,
            "think_s": args.think_s,
            "finalize_num_inference_steps": args.steps,
            "finalize_strength": args.finalize_strength,
            "node_start_s": args.node_start_s,
            "gpu_profile": args.gpu_profile or "diffusionx/models/gpu_profiles/a100-sd15-tiny-sd.json",
            "ahead_policy_kwargs": {**AHEAD_KWARGS, **ahead_kwargs},
            "cloud_replica_start_s": start_s,
            "sample_s": args.sample_s,
            "window_s": args.window_s,
            "cooldown_s": args.cooldown_s,
            "replica_s_span_s": measured_span_s(ramp, args),
            "config": "serve_config_autoscale.yaml",
            "wall_s": round(time.monotonic() - began, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "policies": results,
        "comparison": {
            policy: {
                key: result["summary"][key]
                for key in (
                    "cloud_replica_s",
                    "exact_cloud_replica_s",
                    "node_s",
                    "finalize_latency_s",
                    "slo_attainment",
                    "time_to_capacity_s",
                )
            }
            for policy, result in results.items()
        },
    }
    (out / "autoscale.json").write_text(json.dumps(report, indent=1))
    write_trace(arrivals, out / "arrivals_trace.csv")
    write_timeline_csv(results, out / "timeline.csv")
    plot(results, ramp, sizing, out / "autoscale.png")
    print(
        f"wrote {out}/autoscale.json, timeline.csv, requests_*.csv, arrivals_trace.csv, autoscale.png "
        f"in {report['setup']['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
