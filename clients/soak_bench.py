"""`diffusionx bench soak --minutes M`: mixed sessions at about `--load` (0.7) of capacity for M minutes,
watching memory, the preview cache, queues and latency over time.

1. Start the local application (default: the embedded CPU config; `--config`), or use `--url` (then the
   replicas' memory is read only if this process can reach its Ray).
2. Capacity: the load generator's sessions (`clients.loadgen`: previews, an edit, a finalize, with think
   times) arrive at `--probe-rate` per second for `--probe-s`, past what the server can take; capacity =
   the finalizes answered per second (a session ends in one finalize).
3. Soak: session arrivals at `--load` x capacity (Poisson) for M minutes. Every `--sample-s` seconds:
   the resident memory of every replica (`deployments.replica_memory`: VmRSS from /proc), the preview
   cache (entries, bytes) and each tier's queued and in-flight work (`/v1/stats`).
4. Write `DIR/soak_timeline.csv` (one row per sample: those values, one `rss_mib:<deployment>:<pid>`
   column per replica, and the p50/p95 latency of the requests that ended in the `--sample-s` before),
   `DIR/soak_requests.csv` (every request) and `DIR/soak.png`.

Summary (`--json` prints it as the last line): `errors` (requests that did not answer 200: refusals
count), `rss_growth_max` (the largest relative growth of a replica's RSS from the sample after the
warm-up to the last sample; replicas that did not live through both are left out), `cache_mib` (the
preview cache's contents at those two samples: it lives in the shared state's RSS and fills by design, so
it tells that growth from a leak), and `p95_first_s` / `p95_last_s`, the p95 latency of all requests
ending in the first window after the warm-up and in the last window. The warm-up and the windows are 5
minutes each, or a fifth of the run for runs under 25 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from clients.loadgen import LoadgenConfig, run_loadgen, write_rows
from clients.workload import poisson_arrivals
from diffusionx.experiments.outputs import bench_results_dir

DEPLOYMENTS = ("EdgePreviewer", "CloudRefiner", "StrengthPredictor", "DiffusionXIngress", "SharedState")
DEFAULT_OUT = bench_results_dir("soak")
PROGRESS_EVERY_S = 60.0  # a progress line on stderr: a soak runs for many minutes


def replica_rss() -> dict[str, float]:
    """`<deployment>:<pid>` -> resident MiB of every live replica (empty when Ray is not reachable)."""
    try:
        from deployments.replica_memory import memory_mib, replica_pids
    except ImportError:
        return {}
    rss = {}
    for deployment in DEPLOYMENTS:
        for pid in replica_pids(deployment):
            try:
                rss[f"{deployment}:{pid}"] = memory_mib(pid)["rss"]
            except (FileNotFoundError, ProcessLookupError, KeyError):  # the replica just went away
                continue
    return rss


def sample(url: str, t_s: float) -> dict[str, Any]:
    """One sample: replicas' RSS, the preview cache and the tiers' queues."""
    row: dict[str, Any] = {"t_s": round(t_s, 1)}
    try:
        stats = httpx.get(f"{url}/v1/stats", timeout=10.0).json()
        cache = stats.get("preview_cache", {})
        row.update(cache_entries=cache.get("size"), cache_mib=round(cache.get("bytes", 0) / 2**20, 2))
        for tier, view in stats.get("tiers", {}).items():
            row[f"{tier}_queued"] = view.get("queued")
            row[f"{tier}_in_flight"] = view.get("in_flight")
            row[f"{tier}_replicas"] = view.get("replicas")
    except (httpx.HTTPError, ValueError) as error:
        row["stats_error"] = type(error).__name__
    row.update({f"rss_mib:{name}": mib for name, mib in replica_rss().items()})
    return row


def progress_line(row: dict[str, Any], duration_s: float) -> str:
    """One sample as a progress line: time, queues, preview cache and the replicas' summed RSS."""
    rss = sum(v for k, v in row.items() if k.startswith("rss_mib:") and v)
    queues = ", ".join(f"{tier} queued {row.get(f'{tier}_queued')}" for tier in ("edge", "cloud"))
    return (
        f"soak {row['t_s'] / 60:.1f}/{duration_s / 60:.0f} min: {queues}, "
        f"cache {row.get('cache_entries')} previews, replicas' RSS {rss:.0f} MiB"
    )


class Sampler(threading.Thread):
    """Samples every `every_s` seconds from `start` until stopped; a progress line every minute."""

    def __init__(self, url: str, every_s: float, start: float, duration_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s, self.start_at, self.duration_s = url, every_s, start, duration_s
        self.samples: list[dict[str, Any]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        printed = -PROGRESS_EVERY_S
        while not self.stopped.is_set():
            row = sample(self.url, time.perf_counter() - self.start_at)
            self.samples.append(row)
            if row["t_s"] - printed >= PROGRESS_EVERY_S:
                print(progress_line(row, self.duration_s), file=sys.stderr, flush=True)
                printed = row["t_s"]
            self.stopped.wait(self.every_s)


def end_s(row: dict[str, Any]) -> float:
    return float(row["arrival_s"]) + float(row["e2e_ms"]) / 1000.0


def p95(rows: list[dict[str, Any]], start_s: float, stop_s: float) -> float | None:
    """p95 latency (s) of the answered requests that ended in [start_s, stop_s)."""
    latencies = [
        float(r["e2e_ms"]) / 1000 for r in rows if r["status"] == 200 and start_s <= end_s(r) < stop_s
    ]
    return round(float(np.percentile(latencies, 95)), 3) if latencies else None


def add_latencies(samples: list[dict[str, Any]], rows: list[dict[str, Any]], window_s: float) -> None:
    for s in samples:
        ended = [
            float(r["e2e_ms"]) / 1000
            for r in rows
            if r["status"] == 200 and 0 <= s["t_s"] - end_s(r) < window_s
        ]
        s["latency_s_p50"] = round(float(np.percentile(ended, 50)), 3) if ended else None
        s["latency_s_p95"] = round(float(np.percentile(ended, 95)), 3) if ended else None


def summarize(
    samples: list[dict[str, Any]], rows: list[dict[str, Any]], minutes: float, duration_s: float
) -> dict[str, Any]:
    window_s = 300.0 if minutes >= 25 else duration_s / 5
    after = next((s for s in samples if s["t_s"] >= window_s), samples[0] if samples else {})
    last = samples[-1] if samples else {}
    growth = {
        name.removeprefix("rss_mib:"): round((last[name] - after[name]) / after[name], 4)
        for name in after
        if name.startswith("rss_mib:") and name in last and after[name]
    }
    return {
        "minutes": minutes,
        "errors": sum(1 for r in rows if r["status"] != 200),
        "requests": len(rows),
        "rss_growth_max": max(growth.values()) if growth else None,
        "rss_growth": growth,
        # the preview cache lives in the shared state's RSS and fills by design (bounded by bytes and age):
        # its contents at both ends tell that growth from a leak
        "cache_mib": {"after_warm_up": after.get("cache_mib"), "last": last.get("cache_mib")},
        "p95_first_s": p95(rows, window_s, 2 * window_s),
        "p95_last_s": p95(rows, duration_s - window_s, duration_s),
        "window_s": window_s,
    }


def write_timeline(samples: list[dict[str, Any]], path: Path) -> Path:
    columns: list[str] = []
    for s in samples:
        columns += [c for c in s if c not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(samples)
    return path


def plot(samples: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, (memory, queues, latency) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    names = sorted({c for s in samples for c in s if c.startswith("rss_mib:")})
    for name in names:
        memory.plot(t, [s.get(name) for s in samples], label=name.removeprefix("rss_mib:"))
    memory.set_ylabel("replica RSS (MiB)")
    memory.legend(fontsize=6)
    for column in ("edge_queued", "cloud_queued", "cache_entries"):
        queues.plot(t, [s.get(column) for s in samples], label=column)
    queues.set_ylabel("queued / entries")
    queues.legend(fontsize=7)
    for column in ("latency_s_p50", "latency_s_p95"):
        latency.plot(t, [s.get(column) for s in samples], label=column)
    latency.set_ylabel("latency (s)")
    latency.set_xlabel("minutes")
    latency.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def capacity_sessions_per_s(url: str, rate: float, seconds: float, seed: int) -> float:
    """Finalizes answered per second while sessions arrive at `rate` for `seconds` (past capacity)."""
    arrivals = poisson_arrivals(rate, seconds, 10**6, random.Random(seed))
    config = LoadgenConfig(url, "sessions", arrivals, seconds, max_requests=10**6, drain_s=60.0, seed=seed)
    config.progress = False
    started = time.perf_counter()
    rows, _ = asyncio.run(run_loadgen(config))
    finalized = [r for r in rows if r["kind"] == "finalize" and r["status"] == 200]
    elapsed = max((end_s(r) for r in finalized), default=time.perf_counter() - started)
    return len(finalized) / max(1.0, elapsed)


def soak(url: str, minutes: float, load: float, capacity: float, sample_s: float, seed: int) -> dict:
    duration_s = minutes * 60.0
    rate = load * capacity
    arrivals = poisson_arrivals(rate, duration_s, 10**7, random.Random(seed + 1))
    config = LoadgenConfig(url, "sessions", arrivals, duration_s, max_requests=10**7, drain_s=0.0, seed=seed)
    config.progress = False
    start = time.perf_counter()
    sampler = Sampler(url, sample_s, start, duration_s)
    sampler.start()
    rows, _ = asyncio.run(run_loadgen(config))
    sampler.stopped.set()
    sampler.join()
    add_latencies(sampler.samples, rows, sample_s)
    return {
        "rows": rows,
        "samples": sampler.samples,
        "summary": {
            **summarize(sampler.samples, rows, minutes, duration_s),
            "capacity_sessions_per_s": round(capacity, 3),
            "offered_sessions_per_s": round(rate, 3),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusionx bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--url", help="a running server (default: start the local application)")
    parser.add_argument("--config", help="serve config of the local application (default: embedded CPU)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--load", type=float, default=0.7, help="offered load / capacity (default 0.7)")
    parser.add_argument("--capacity", type=float, help="sessions per second (default: measured)")
    parser.add_argument("--probe-rate", type=float, default=3.0, help="sessions/s while probing capacity")
    parser.add_argument("--probe-s", type=float, default=30.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line, last")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or not 0 < args.load <= 2:
        parser.error("--minutes must be > 0 and --load in (0, 2]")
    stop = None
    url = args.url
    if url is None:
        from deployments.local import start_local_app, stop_local_app

        print("starting Ray Serve ...", file=sys.stderr, flush=True)
        url, stop = start_local_app(args.config, port=args.port), stop_local_app
    try:
        capacity = args.capacity or capacity_sessions_per_s(url, args.probe_rate, args.probe_s, args.seed)
        print(
            f"capacity {capacity:.3f} sessions/s; soaking at {args.load} x for {args.minutes} min",
            file=sys.stderr,
        )
        time.sleep(5.0)  # the probe's queues drain
        result = soak(url, args.minutes, args.load, capacity, args.sample_s, args.seed)
    finally:
        if stop is not None:
            stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        write_timeline(result["samples"], out / "soak_timeline.csv"),
        write_rows(result["rows"], out / "soak_requests.csv"),
        plot(result["samples"], out / "soak.png"),
    ]
    (out / "soak.json").write_text(json.dumps(result["summary"], indent=2))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    print(json.dumps(result["summary"], indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
