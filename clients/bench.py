"""`diffusionx bench preview|refine`: latency, throughput and batching of preview requests (edge tier) or
refinement requests at a given strength (cloud tier) under concurrency.

For each concurrency level N (default 1, 4, 16), N async workers each keep one request in flight until
`--requests` requests have been answered (`refine`: each refines one preview made before the levels, by its
`preview_id`, at `--strength`; the predictor is then not called). Per request it records the client's
end-to-end HTTP latency and what the server reports in `timings_ms`: `model_total` (time inside the model),
`queue` (waiting for a batch slot), `batch_size` and `server_total`. Per level it reports median and p95 of
each, the serving overhead (end-to-end minus model time: HTTP, proxy, handles, batching wait, PNG encoding),
throughput, the batch sizes seen in the responses (per request: the batch each request was in) and in GET
/v1/stats (per batch: the batches of the tier's `recent_batch_sizes` that served the level), and errors by
type.

Targets `--url`, or starts the local application (`deployments.local.start_local_app`) and stops it after.
Writes <benchmark>.json (everything), <benchmark>_levels.csv, <benchmark>_requests.csv and <benchmark>.md
(e.g. preview.json) under `--out` (default `bench_results/<benchmark>/`).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clients import compare_bench
from clients.client import AsyncDiffusionXClient, DiffusionXClient
from clients.errors import DiffusionXError
from clients.results import TierStats
from diffusionx.experiments.outputs import bench_results_dir

DEFAULT_LEVELS = (1, 4, 16)
DEFAULT_REQUESTS = 100  # per level
STATS_SETTLE_S = 0.5  # tier replicas report their stats asynchronously after each batch
DEFAULT_WARMUP = 4  # requests before the first level, not recorded (first batches load kernels, caches)
DEFAULT_STRENGTH = 0.5  # bench refine
TIER = {"preview": "edge", "refine": "cloud"}  # the tier each benchmark loads


@dataclass
class RequestRecord:
    """One request as measured (times in ms; server fields None when it did not report them)."""

    concurrency: int
    index: int
    ok: bool
    error: str | None
    started_ms: float  # since the level started
    e2e_ms: float
    model_ms: float | None = None
    queue_ms: float | None = None
    server_ms: float | None = None
    batch_size: float | None = None

    @property
    def overhead_ms(self) -> float | None:
        return None if self.model_ms is None else self.e2e_ms - self.model_ms


def distribution(values: list[float | None]) -> dict[str, float | None]:
    """median, p95, mean and max of the non-None values (all None when there are none)."""
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if present.size == 0:
        return {"median": None, "p95": None, "mean": None, "max": None}
    return {
        "median": round(float(np.median(present)), 3),
        "p95": round(float(np.percentile(present, 95)), 3),
        "mean": round(float(present.mean()), 3),
        "max": round(float(present.max()), 3),
    }


def summarize_level(
    records: list[RequestRecord], concurrency: int, wall_s: float, stats_batch_sizes: list[int]
) -> dict[str, Any]:
    """The per-level row: counts, throughput and distributions of the measured times and batch sizes."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    error_examples: dict[str, str] = {}  # the first message of each kind, to say what went wrong
    for r in records:
        if not r.ok:
            kind = (r.error or "error").split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
            error_examples.setdefault(kind, r.error or "")
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "ok": len(ok),
        "errors": errors,
        "error_examples": error_examples,
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "e2e_ms": distribution([r.e2e_ms for r in ok]),
        "model_ms": distribution([r.model_ms for r in ok]),
        "overhead_ms": distribution([r.overhead_ms for r in ok]),
        # serving overhead as a share of model time, per request (the target: at most 5% at production size)
        "overhead_share": distribution([(r.e2e_ms - r.model_ms) / r.model_ms for r in ok if r.model_ms]),
        "queue_ms": distribution([r.queue_ms for r in ok]),
        "server_ms": distribution([r.server_ms for r in ok]),
        "batch_size": distribution([r.batch_size for r in ok]),
        "stats_batch_sizes": distribution([float(b) for b in stats_batch_sizes]),
    }


async def run_level(
    url: str,
    concurrency: int,
    prompts: list[str],
    timeout_s: float,
    request_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    transport: Any = None,
    benchmark: str = "preview",
) -> tuple[list[RequestRecord], float]:
    """Sends one request per prompt (POST /v1/<benchmark>, with `request_kwargs`) from `concurrency`
    workers; returns the records and the wall time (s).

    `transport` replaces the network (tests pass an `httpx.MockTransport`).
    """
    records: list[RequestRecord] = []
    indices = iter(range(len(prompts)))  # shared by the workers; asyncio is single-threaded
    bar = tqdm(total=len(prompts), desc=f"concurrency {concurrency:>3}", unit="req", disable=not progress)

    # no client retries: the server's own answers (a 503 included) are what is measured
    async with AsyncDiffusionXClient(
        url, timeout_s, max_retries=0, max_connections=concurrency, transport=transport
    ) as client:
        send = client.refine if benchmark == "refine" else client.preview

        async def worker() -> None:
            for index in indices:
                sent = time.perf_counter()
                try:
                    result = await send(prompts[index], seed=index, **(request_kwargs or {}))
                except DiffusionXError as error:
                    e2e_ms = (time.perf_counter() - sent) * 1000.0
                    record = RequestRecord(
                        concurrency, index, False, f"{type(error).__name__}: {error}", 0.0, e2e_ms
                    )
                else:
                    t = result.timings_ms
                    record = RequestRecord(
                        concurrency,
                        index,
                        True,
                        None,
                        0.0,
                        result.latency_ms,
                        t.get("model_total"),
                        t.get("queue"),
                        t.get("server_total"),
                        t.get("batch_size"),
                    )
                record.started_ms = round((sent - start) * 1000.0, 3)
                records.append(record)
                bar.update(1)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
    bar.close()
    records.sort(key=lambda r: r.index)
    return records, wall_s


def _cell(dist: dict[str, float | None], digits: int = 0) -> str:
    if dist["median"] is None:
        return "-"
    return f"{dist['median']:.{digits}f} / {dist['p95']:.{digits}f}"


def format_table(levels: list[dict[str, Any]]) -> str:
    """Markdown table of the level summaries (times in ms as median / p95)."""
    lines = [
        "| concurrency | ok / sent | errors | throughput (req/s) | e2e ms | model ms | overhead ms "
        "| overhead / model | queue ms | batch size (responses) | batch size (/v1/stats) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        errors = ", ".join(f"{k} {v}" for k, v in level["errors"].items()) or "-"
        batch, stats = level["batch_size"], level["stats_batch_sizes"]
        batch_cell = "-" if batch["mean"] is None else f"mean {batch['mean']:.1f}, max {batch['max']:.0f}"
        stats_cell = "-" if stats["mean"] is None else f"mean {stats['mean']:.1f}, max {stats['max']:.0f}"
        throughput = "-" if level["throughput_rps"] is None else f"{level['throughput_rps']:.2f}"
        share = level["overhead_share"]
        share_cell = "-" if share["median"] is None else f"{share['median']:.1%} / {share['p95']:.1%}"
        lines.append(
            f"| {level['concurrency']} | {level['ok']} / {level['requests']} | {errors} | {throughput} "
            f"| {_cell(level['e2e_ms'])} | {_cell(level['model_ms'])} | {_cell(level['overhead_ms'])} "
            f"| {share_cell} | {_cell(level['queue_ms'])} | {batch_cell} | {stats_cell} |"
        )
    return "\n".join(lines) + "\n"


def write_results(report: dict[str, Any], records: list[RequestRecord], out_dir: Path) -> list[Path]:
    """<benchmark>.json, <benchmark>_levels.csv, <benchmark>_requests.csv and <benchmark>.md under
    `out_dir` (benchmark: the report's, default preview)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report.get("benchmark", "preview")
    paths = [out_dir / f"{name}{suffix}" for suffix in (".json", "_levels.csv", "_requests.csv", ".md")]
    json_path, levels_path, requests_path, md_path = paths
    json_path.write_text(json.dumps({**report, "requests": [asdict(r) for r in records]}, indent=2) + "\n")

    with levels_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        metrics = (
            "e2e_ms",
            "model_ms",
            "overhead_ms",
            "overhead_share",
            "queue_ms",
            "server_ms",
            "batch_size",
            "stats_batch_sizes",
        )
        writer.writerow(
            ["concurrency", "requests", "ok", "errors", "wall_s", "throughput_rps"]
            + [f"{m}_{s}" for m in metrics for s in ("median", "p95", "mean", "max")]
        )
        for level in report["levels"]:
            errors = ";".join(f"{k}={v}" for k, v in level["errors"].items())
            writer.writerow(
                [level[k] for k in ("concurrency", "requests", "ok")]
                + [errors, level["wall_s"], level["throughput_rps"]]
                + [level[m][s] for m in metrics for s in ("median", "p95", "mean", "max")]
            )

    with requests_path.open("w", newline="") as handle:
        fields = [*RequestRecord.__dataclass_fields__, "overhead_ms"]
        record_writer = csv.DictWriter(handle, fieldnames=fields)
        record_writer.writeheader()
        for record in records:
            record_writer.writerow({**asdict(record), "overhead_ms": record.overhead_ms})

    setup = report["setup"]
    origin = "started by the bench" if setup["started_local_app"] else "already running"
    models = setup["models"]
    md_path.write_text(
        f"# {name.capitalize()} benchmark\n\n"
        f"Server {setup['url']} ({origin}); models: edge `{models.get('edge', '?')}`, "
        f"cloud `{models.get('cloud', '?')}`; {setup['requests_per_level']} requests per level; "
        f"client on {setup['machine']}.\n\n"
        "Times in ms as median / p95. `model` is the server's `timings_ms.model_total` (the batch's model "
        "time); `overhead` = end-to-end − model (HTTP, proxy, handles, batch wait, encoding), also as a "
        "share of model time per request; `queue` is "
        "the wait for a batch slot as the tier reports it. Batch size from the responses is per request (the "
        "batch each request was in); from /v1/stats it is per batch.\n\n" + format_table(report["levels"])
    )
    return paths


def bench_prompts(n: int, seed: int) -> list[str]:
    """`n` varied shapes-world captions (held-out prompts), deterministic in `seed`."""
    from diffusionx.shapes.data import heldout_prompts

    return heldout_prompts(n, seed)


def batches_since(recent_batch_sizes: list[int], requests_served: int) -> list[int]:
    """The batches that served the last `requests_served` requests: the shortest tail of the stats window
    that adds up to them (all of the window when it is shorter; stats report a bounded window)."""
    tail: list[int] = []
    for size in reversed(recent_batch_sizes):
        if sum(tail) >= requests_served:
            break
        tail.append(size)
    return tail[::-1]


async def _tier_stats(client: AsyncDiffusionXClient, tier: str) -> TierStats:
    stats = await client.stats()
    return stats.tiers.get(tier) or TierStats()


async def request_kwargs(url: str, args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    """What every request of the benchmark sends besides prompt and seed; `refine` makes its preview."""
    size = {"width": args.size, "height": args.size} if args.size else {}
    steps = {"num_inference_steps": args.steps} if args.steps else {}
    if args.benchmark == "preview":
        return {**steps, **size}
    async with AsyncDiffusionXClient(url, args.timeout_s) as client:
        preview = await client.preview(prompt, **size)
    return {"preview_id": preview.preview_id, "strength": args.strength, **steps}


async def _bench(url: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[RequestRecord]]:
    prompts = bench_prompts(args.requests, args.seed)
    kwargs = await request_kwargs(url, args, prompts[0])
    tier = TIER[args.benchmark]
    if args.warmup:
        warmup = prompts[: args.warmup]
        await run_level(url, min(args.warmup, 4), warmup, args.timeout_s, kwargs, False, None, args.benchmark)
    levels, records = [], []
    async with AsyncDiffusionXClient(url, args.timeout_s) as stats_client:
        for concurrency in args.concurrency:
            before = await _tier_stats(stats_client, tier)
            level_records, wall_s = await run_level(
                url, concurrency, prompts, args.timeout_s, kwargs, benchmark=args.benchmark
            )
            await asyncio.sleep(STATS_SETTLE_S)
            after = await _tier_stats(stats_client, tier)
            served = after.requests_served - before.requests_served
            batches = batches_since(after.recent_batch_sizes, served)
            level = summarize_level(level_records, concurrency, wall_s, batches)
            levels.append(level)
            records += level_records
            print(format_table([level]).splitlines()[-1], flush=True)
            for example in level["error_examples"].values():
                print(f"  e.g. {example}", flush=True)
    return levels, records


def _levels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency {text!r}: use comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency {text!r}: every level must be at least 1")
    return values


# benches with their own options, in their own modules: bench -> (module with `main(argv)`, one-line help)
DELEGATED: dict[str, tuple[str, str]] = {
    "autoscale": (
        "clients.bench_autoscale",
        "tiers scaling on Ray's local autoscaling cluster (stops every local Ray process; see its --help)",
    ),
    "shed": ("clients.shed_bench", "how fast overload is refused: 503 latency against admitted latency"),
    "faults": (
        "deployments.faults",
        "SIGKILL every replica of each deployment under load, or with --node cloud|edge [--drain] lose a "
        "node of a multi-node cluster (deployments/node_faults.py): failed sessions",
    ),
    "tenants": ("clients.tenants_bench", "two API keys share the cloud tier by weight while one floods it"),
    "soak": ("clients.soak_bench", "sessions at ~0.7x capacity for minutes: replica memory, queues, p95"),
    "state-memory": ("deployments.state_memory", "memory of the shared preview cache after N previews"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="diffusionx bench",
        description="Serving benchmarks against the local application (started for the run, stopped after) "
        "or a running server. Each bench writes under bench_results/<bench>/ by default.",
        epilog="`diffusionx bench BENCH --help` shows a bench's options.",
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCH", help="which bench")
    preview = sub.add_parser(
        "preview",
        help="latency / throughput / batching of POST /v1/preview",
        description=__doc__.split("\n\n")[0],
    )
    refine = sub.add_parser(
        "refine",
        help="the same for POST /v1/refine at a given strength (cloud tier)",
        description=__doc__.split("\n\n")[0],
    )
    refine.add_argument(
        "--strength",
        type=float,
        default=DEFAULT_STRENGTH,
        help=f"refine strength (default {DEFAULT_STRENGTH})",
    )
    for p in (preview, refine):
        _add_common_args(p)
    compare = sub.add_parser(
        "compare",
        help="every mode, and the router against a fixed policy (summary.json)",
        description=compare_bench.__doc__.split("\n\n")[0],
    )
    compare_bench.add_arguments(compare)
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)  # parsed by its module (`main`)
    args = parser.parse_args(argv)
    if args.benchmark == "compare":
        return args
    if args.out is None:
        args.out = bench_results_dir(args.benchmark)
    if args.requests < 1:
        parser.error(f"--requests {args.requests}: at least 1")
    if args.benchmark == "refine" and not 0.0 < args.strength <= 1.0:
        parser.error(f"--strength {args.strength}: use a value in (0, 1]")
    return args


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="benchmark this running server (default: start the local app)")
    p.add_argument("--concurrency", type=_levels, default=list(DEFAULT_LEVELS), help="levels, e.g. 1,4,16")
    p.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="requests per level (default 100)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="unrecorded requests first (default 4)")
    p.add_argument("--steps", type=int, help="num_inference_steps per request (default: the model's)")
    p.add_argument(
        "--size", type=int, help="width and height of the (refined) preview (default: the model's)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt set (request i uses seed i)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="client timeout per request")
    p.add_argument("--out", help="output directory (default bench_results/preview/ or bench_results/refine/)")
    p.add_argument("--config", help="serve config for the local app (default: the embedded CPU application)")
    p.add_argument("--port", type=int, default=8000, help="port of the local app (default 8000)")
    p.add_argument("--edge-model", help="edge model override for the local app")
    p.add_argument("--cloud-model", help="cloud model override for the local app")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in DELEGATED:
        return int(importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:]) or 0)
    args = parse_args(argv)
    if args.benchmark == "compare":
        return compare_bench.main(args)
    stop = None
    try:
        if args.url:
            url = args.url
        else:
            from deployments.local import start_local_app, stop_local_app

            overrides = {"edge_model": args.edge_model, "cloud_model": args.cloud_model}
            overrides = {k: v for k, v in overrides.items() if v}
            print("starting Ray Serve ...", flush=True)
            stop = stop_local_app
            url = start_local_app(args.config, port=args.port, overrides=overrides or None)
        with DiffusionXClient(url, args.timeout_s) as client:
            health = client.health().details
        models = {tier: (health.get(tier) or {}).get("model", "?") for tier in ("edge", "cloud")}
        tier = TIER[args.benchmark]
        print(
            f"benchmarking {url} ({tier} {models[tier]}): {args.requests} {args.benchmark} per level",
            flush=True,
        )
        print(format_table([]).rstrip(), flush=True)
        levels, records = asyncio.run(_bench(url, args))
        report = {
            "benchmark": args.benchmark,
            "setup": {
                "url": url,
                "started_local_app": stop is not None,
                "models": models,
                "requests_per_level": args.requests,
                "concurrency": args.concurrency,
                "warmup": args.warmup,
                "num_inference_steps": args.steps,
                "strength": getattr(args, "strength", None),
                "size": args.size,
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            "levels": levels,
        }
        paths = write_results(report, records, Path(args.out))
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except DiffusionXError as error:
        print(f"bench failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    sys.exit(main())
