"""`diffusionx bench autoscale [--quick] [--out DIR]`: the tiers scaling on Ray's local autoscaling cluster.

1. Start `ray.cluster_utils.AutoscalingCluster` (`deployments.autoscaling_cluster`): a head node and fake
   `cloud` / `edge` node types carrying the tier resources of `serve_config_autoscale.yaml`.
2. For each cloud autoscaling policy, `work` (`QueuedStepsPolicy`, the config's) then `default` (Serve's
   request-count policy, same bounds and delays): deploy the application, replay the same ramped session
   workload with the load generator (`clients.loadgen`: session arrivals rise linearly to `--peak-rate`,
   hold, fall back; each session previews, edits and finalizes), and sample every `--sample-s` seconds the
   running replicas per tier (Serve), the alive nodes (GCS) and the cloud tier's queued steps
   (`/v1/stats`); after the last arrival keep sampling for `--cooldown-s` to watch both scale down.
3. Write `DIR/autoscale.json` (`timeline` of the work policy: `t_s`, `offered_rps`, `replicas` per tier,
   `nodes`, `queued_steps`, `finalize_latency_s_p95`; per policy its timeline and summary; the
   comparison), the requests CSV of each policy (`requests.csv`, `requests_default.csv`), the session
   arrivals as a loadgen trace (`arrivals_trace.csv`, for the same ramp against a real cluster) and one
   PNG (`autoscale.png`).

`offered_rps` is the rate of requests sent (all kinds) and the p95 is over finalizes that ended, both in
the `--window-s` before each sample. Times are seconds from the start of the load. `DIR` defaults to
`bench_results/autoscale/`.

It stops every local Ray process: Ray's `AutoscalingCluster` runs `ray stop --force` when it starts and
when it ends, which also ends any other Ray cluster on this machine (a `diffusionx serve`, another bench,
a test run). Run it on a machine of its own, or where every Ray user holds the same lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from clients.loadgen import LoadgenConfig, run_loadgen, write_rows
from clients.workload import poisson_arrivals, ramp_arrivals
from diffusionx.experiments.outputs import bench_results_dir

POLICIES = ("work", "default")
DEFAULT_OUT = bench_results_dir("autoscale")
RAY_STOP_WARNING = (
    "warning: this bench stops every local Ray process (`ray stop --force`, by Ray's AutoscalingCluster) "
    "when it starts and when it ends, other Ray clusters on this machine included"
)
RAY_STOP_GRACE_S = 10.0  # time to press Ctrl-C when another Ray cluster runs here


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


QUICK = Ramp(peak_rate=1.5, up_s=45.0, hold_s=45.0, down_s=30.0)
FULL = Ramp(peak_rate=1.5, up_s=120.0, hold_s=120.0, down_s=90.0)


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
                "nodes": sample["nodes"],
                "queued_steps": sample["queued_steps"],
                "finalize_latency_s_p95": p95(ended),
            }
        )
    return timeline


def _integral(times: list[float], values: list[float]) -> float:
    """Seconds x value, each sample's value held until the next sample."""
    return float(sum(v * (b - a) for a, b, v in zip(times, times[1:], values, strict=False)))


def _back_to(times: list[float], values: list[float], level: float, after_s: float) -> float | None:
    """The first time >= after_s from which `values` stay at or below `level` to the end."""
    found = None
    for t, v in zip(times, values, strict=True):
        if t < after_s:
            continue
        found = (t if found is None else found) if v <= level else None
    return found


def summarize(timeline: list[dict], rows: list[dict[str, Any]], ramp: Ramp) -> dict[str, Any]:
    """The figures of one run: peak offered load, cloud replicas and nodes min -> max -> end, time to
    scale up (load start to the first added cloud replica, and to the peak) and down (load falling to
    back at the minimum), replica- and node-seconds, finalize latency."""
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
        "cloud_replica_s": round(_integral(times, cloud), 1),
        "tier_replica_s": round(_integral(times, [sum(e["replicas"].values()) for e in timeline]), 1),
        "node_s": round(_integral(times, nodes), 1),
        "finalize_latency_s": {
            "n": len(finals),
            "p50": round(float(np.median(finals)), 3) if finals else None,
            "p95": p95(finals),
        },
        "requests": len(rows),
        "errors": sum(1 for r in rows if r["status"] != 200),
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


async def _run_once(url: str, args: argparse.Namespace, ramp: Ramp, arrivals: list[float]) -> tuple:
    config = LoadgenConfig(
        url=url,
        workload="sessions",
        arrivals=arrivals,
        duration_s=ramp.duration_s,
        max_requests=100_000,
        drain_s=args.drain_s,
        rounds=args.rounds,
        think_s=args.think_s,
        num_inference_steps=args.steps,
        seed=args.seed,
        timeout_s=args.timeout_s,
        progress=False,
    )
    samples: list[dict] = []
    stop = asyncio.Event()
    start = time.perf_counter()
    sampler = asyncio.create_task(_sample_loop(url, start, stop, args.sample_s, samples))
    rows, _ = await run_loadgen(config)
    load_end = time.perf_counter() - start
    while time.perf_counter() - start < load_end + args.cooldown_s:
        await asyncio.sleep(1.0)
    stop.set()
    await sampler
    return rows, samples


def _wait_for_minimum(timeout_s: float) -> None:
    """Before a run: cloud back at one replica and no worker node left (the previous run scaled down)."""
    from deployments.autoscaling_cluster import sample_cluster

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sample = sample_cluster()
        if sample.replicas["cloud"] <= 1 and sample.nodes <= 3:
            return
        time.sleep(2.0)


def cloud_autoscaling(policy: str) -> dict[str, Any]:
    """The cloud tier's autoscaling_config for `policy`: the config's (work), or the same without the
    custom policy (Serve's default on target_ongoing_requests, same bounds and delays)."""
    import yaml

    from deployments.local import AUTOSCALE_CONFIG

    raw = yaml.safe_load(Path(AUTOSCALE_CONFIG).read_text())
    cloud = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "CloudRefiner")
    autoscaling = dict(cloud["autoscaling_config"])
    if policy == "default":
        autoscaling.pop("policy", None)
    return autoscaling


def plot(results: dict[str, dict], ramp: Ramp, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    styles = {"work": "-", "default": "--"}
    for policy, result in results.items():
        tl = result["timeline"]
        t = [e["t_s"] for e in tl]
        style = styles[policy]
        axes[0].plot(t, [e["offered_rps"] for e in tl], style, label=f"{policy} policy run")
        for tier, color in (("cloud", "C0"), ("edge", "C1"), ("predictor", "C2")):
            axes[1].step(
                t,
                [e["replicas"][tier] for e in tl],
                style,
                color=color,
                where="post",
                label=f"{tier} ({policy})",
            )
        axes[2].step(t, [e["nodes"] for e in tl], style, where="post", label=policy)
        axes[3].plot(t, [e["finalize_latency_s_p95"] for e in tl], style, marker=".", label=policy)
    for ax in axes:
        ax.axvspan(ramp.up_s, ramp.up_s + ramp.hold_s, color="0.9", zorder=0)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("offered req/s")
    axes[1].set_ylabel("replicas")
    axes[2].set_ylabel("nodes (with head)")
    axes[3].set_ylabel("finalize p95 (s)")
    axes[3].set_xlabel("seconds from the start of the load (grey: hold at peak)")
    fig.suptitle("diffusionx bench autoscale: work-based vs Serve's default cloud policy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_trace(arrivals: list[float], path: Path) -> Path:
    path.write_text("arrival_ms\n" + "".join(f"{t * 1000.0:.1f}\n" for t in arrivals))
    return path


def warn_ray_stop(running: list[str], grace_s: float = RAY_STOP_GRACE_S, sleep=time.sleep) -> None:
    """Says, before anything is stopped, that every local Ray process will be; when Ray clusters already
    run here (`running`: their GCS addresses), names them and waits `grace_s` for a Ctrl-C."""
    print(RAY_STOP_WARNING, file=sys.stderr, flush=True)
    if running:
        print(
            f"warning: {len(running)} Ray cluster(s) running here now ({', '.join(running)}) will be "
            f"stopped; Ctrl-C within {grace_s:g} s to keep them",
            file=sys.stderr,
            flush=True,
        )
        sleep(grace_s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="diffusionx bench autoscale",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short ramp: {QUICK.up_s:g} s up, {QUICK.hold_s:g} s hold, {QUICK.down_s:g} s down "
        f"(default: {FULL.up_s:g}, {FULL.hold_s:g}, {FULL.down_s:g} s)",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help=f"policies to run, in order ({','.join(POLICIES)})"
    )
    parser.add_argument(
        "--peak-rate", type=float, help=f"sessions per second at the peak (default {FULL.peak_rate:g})"
    )
    parser.add_argument("--rounds", type=int, default=2, help="previews per session (default 2)")
    parser.add_argument("--think-s", type=float, default=1.5, help="mean think time (default 1.5)")
    parser.add_argument("--steps", type=int, default=50, help="finalize: full-schedule steps (default 50)")
    parser.add_argument("--sample-s", type=float, default=3.0, help="seconds between samples (default 3)")
    parser.add_argument("--window-s", type=float, default=15.0, help="rate and p95 window (default 15)")
    parser.add_argument("--drain-s", type=float, default=30.0, help="sessions end within this (default 30)")
    parser.add_argument("--cooldown-s", type=float, help="sampling after the load (quick 60, else 120)")
    parser.add_argument(
        "--timeout-s", type=float, default=120.0, help="client timeout per request (default 120)"
    )
    parser.add_argument("--seed", type=int, default=0, help="session arrivals, prompts, image seeds")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the application (default 8000)")
    args = parser.parse_args(argv)
    args.policies = [p for p in args.policies.split(",") if p]
    if not args.policies or any(p not in POLICIES for p in args.policies):
        parser.error(f"--policies {args.policies}: use one or both of {', '.join(POLICIES)}")
    if args.cooldown_s is None:
        args.cooldown_s = 60.0 if args.quick else 120.0
    return args


def main(argv: list[str] | None = None) -> int:
    from deployments.autoscaling_cluster import running_ray_clusters, start_cluster, stop_cluster
    from deployments.local import AUTOSCALE_CONFIG, start_local_app

    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    ramp = Ramp(args.peak_rate or base.peak_rate, base.up_s, base.hold_s, base.down_s)
    arrivals = ramp.arrivals(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    warn_ray_stop(running_ray_clusters())
    print(f"ramp {asdict(ramp)}: {len(arrivals)} sessions; starting the autoscaling cluster ...", flush=True)
    cluster = start_cluster()
    results: dict[str, dict] = {}
    try:
        for policy in args.policies:
            _wait_for_minimum(timeout_s=180.0)
            options = {"CloudRefiner": {"autoscaling_config": cloud_autoscaling(policy)}}
            url = start_local_app(
                AUTOSCALE_CONFIG, port=args.port, deployment_options=options, timeout_s=600.0
            )
            print(f"[{policy}] deployed at {url}; running the ramp ...", flush=True)
            rows, samples = asyncio.run(_run_once(url, args, ramp, arrivals))
            timeline = build_timeline(samples, rows, args.window_s)
            summary = summarize(timeline, rows, ramp)
            results[policy] = {
                "timeline": timeline,
                "summary": summary,
                "nodes_by_type": [{"t_s": round(s["t_s"], 2), **s["nodes_by_type"]} for s in samples],
            }
            write_rows(rows, out / ("requests.csv" if policy == "work" else f"requests_{policy}.csv"))
            print(f"[{policy}] {json.dumps(summary)}", flush=True)
    finally:
        print("stopping the autoscaling cluster: `ray stop --force`, every local Ray process ...", flush=True)
        stop_cluster(cluster)
    first = results[args.policies[0]]
    report = {
        "benchmark": "autoscale",
        "setup": {
            "quick": args.quick,
            "ramp": asdict(ramp),
            "sessions": len(arrivals),
            "rounds": args.rounds,
            "think_s": args.think_s,
            "finalize_num_inference_steps": args.steps,
            "sample_s": args.sample_s,
            "window_s": args.window_s,
            "cooldown_s": args.cooldown_s,
            "config": "serve_config_autoscale.yaml",
            "wall_s": round(time.monotonic() - began, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "timeline": first["timeline"],
        "policies": results,
        "comparison": {
            policy: {
                key: result["summary"][key]
                for key in ("cloud_replica_s", "tier_replica_s", "node_s", "finalize_latency_s")
            }
            for policy, result in results.items()
        },
    }
    (out / "autoscale.json").write_text(json.dumps(report, indent=1))
    write_trace(arrivals, out / "arrivals_trace.csv")
    plot(results, ramp, out / "autoscale.png")
    print(
        f"wrote {out}/autoscale.json, requests CSVs, arrivals_trace.csv, autoscale.png "
        f"in {report['setup']['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
