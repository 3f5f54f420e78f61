"""`diffusionx bench tenants`: two API keys of equal weight share the cloud tier; tenant A floods it at
`--a-x-share` (default 5) times its share, tenant B sends `--b-x-share` (default 0.5) times its share.

1. Start the local application with two keys (`api_keys` entries with `weight`, and A's `rate_per_s`
   with `--rate-a-per-s`), or use `--url` with `--key-a`/`--key-b` of a server that has them.
2. Measure the cloud tier's capacity: A alone keeps `--probe-concurrency` finalizes in flight for
   `--probe-s` seconds; capacity = finalizes answered per second. A key's share = capacity x its weight /
   the sum of the weights. B's latency alone: the median of `--solo` finalizes one at a time.
3. Both tenants send finalizes (refinements of one preview at `--strength`, `--steps`, no latency target,
   so they need the cloud tier) as Poisson arrivals at their offered rates for `--duration-s`, without
   retries, so the server's own decisions are counted.

Per tenant: requests, refused (429 or 503, and whether each carried Retry-After), latency percentiles of
the admitted ones and `slo_attainment`, the share of all its requests answered within the SLO (a refused
request misses it): `--slo-s`, by default B's latency alone plus `admission_max_wait_s`, the wait admission
control promises to admitted work (with two equal weights the flooding key may hold at most half of that
wait ahead of B). The targets: B none refused and >= 95% within the SLO; A's excess refused with
Retry-After. `--json` prints the result as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.client import AsyncDiffusionXClient
from clients.errors import DiffusionXError, Overloaded, RateLimited
from clients.workload import poisson_arrivals

PROMPT = "a red circle on the left, blue background"
DEFAULT_MAX_WAIT_S = 2.0  # admission_max_wait_s of the started application


@dataclass
class Outcome:
    tenant: str
    started_s: float
    latency_s: float
    status: str  # "ok", "429", "503" or the error's type
    retry_after: bool = False
    message: str = ""


async def finalize(
    client: AsyncDiffusionXClient, image: str, seed: int, strength: float, steps: int
) -> tuple[str, bool, str]:
    """One refinement: ("ok", False, ""), or the refusal's status, whether it carried Retry-After and
    its message."""
    try:
        await client.refine(PROMPT, image=image, seed=seed, strength=strength, num_inference_steps=steps)
        return "ok", False, ""
    except (Overloaded, RateLimited) as error:
        return str(error.status), error.retry_after_s is not None, error.message
    except DiffusionXError as error:
        return type(error).__name__, False, str(error)


async def probe_capacity(
    client: AsyncDiffusionXClient, image: str, concurrency: int, seconds: float, strength: float, steps: int
) -> float:
    """Finalizes answered per second with `concurrency` in flight for `seconds` (one key alone)."""
    done = 0
    deadline = time.perf_counter() + seconds
    seeds = iter(range(10**9))

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            status, retry_after, _ = await finalize(client, image, next(seeds), strength, steps)
            if status == "ok":
                done += 1
            else:  # refused: come back when told
                await asyncio.sleep(1.0 if not retry_after else 0.5)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def offered_load(
    clients: dict[str, AsyncDiffusionXClient],
    rates: dict[str, float],
    duration_s: float,
    image: str,
    strength: float,
    steps: int,
    seed: int,
) -> list[Outcome]:
    """Every tenant's Poisson arrivals at its rate for `duration_s`; the outcome of each request."""
    outcomes: list[Outcome] = []
    started = time.perf_counter()

    async def one(tenant: str, at: float, index: int) -> None:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
        sent = time.perf_counter()
        status, retry_after, message = await finalize(clients[tenant], image, index, strength, steps)
        latency_s = time.perf_counter() - sent
        outcomes.append(Outcome(tenant, sent - started, latency_s, status, retry_after, message))

    rng = random.Random(seed)
    tasks = [
        one(tenant, at, index)
        for tenant, rate in rates.items()
        for index, at in enumerate(poisson_arrivals(rate, duration_s, 10**6, rng))
    ]
    await asyncio.gather(*tasks)
    return outcomes


def summarize(outcomes: list[Outcome], tenant: str, offered_x_share: float, slo_s: float) -> dict[str, Any]:
    mine = [o for o in outcomes if o.tenant == tenant]
    ok = [o.latency_s for o in mine if o.status == "ok"]
    refused = [o for o in mine if o.status in ("429", "503")]
    within = sum(1 for latency in ok if latency <= slo_s)
    return {
        "offered_x_share": offered_x_share,
        "requests": len(mine),
        "refused": len(refused),
        "refused_429": sum(o.status == "429" for o in refused),
        "refused_503": sum(o.status == "503" for o in refused),
        "refusals_with_retry_after": sum(o.retry_after for o in refused),
        "errors": len(mine) - len(ok) - len(refused),
        "refusal_examples": sorted({o.message[:160] for o in refused})[:4],
        "slo_attainment": round(within / len(mine), 4) if mine else None,
        "latency_s_p50": round(float(np.percentile(ok, 50)), 3) if ok else None,
        "latency_s_p95": round(float(np.percentile(ok, 95)), 3) if ok else None,
    }


async def run(
    url: str,
    keys: dict[str, str],
    x_share: dict[str, float],
    weights: dict[str, float],
    max_wait_s: float,
    duration_s: float = 60.0,
    probe_s: float = 15.0,
    probe_concurrency: int = 8,
    solo: int = 5,
    strength: float = 0.5,
    steps: int = 20,
    slo_s: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The experiment against a running server whose keys `keys` (tenant -> key) have `weights`."""
    clients = {t: AsyncDiffusionXClient(url, 120.0, max_retries=0, api_key=k) for t, k in keys.items()}
    first, last = keys  # the flooding tenant probes the capacity; the light one its latency alone
    try:
        preview = await clients[first].preview(PROMPT, seed=1)
        image = preview.image_base64
        for i in range(2):  # warm-up: the cloud tier measures its step time (admission needs it)
            await finalize(clients[first], image, i, strength, steps)
        capacity_rps = await probe_capacity(
            clients[first], image, probe_concurrency, probe_s, strength, steps
        )
        await asyncio.sleep(max_wait_s)  # the probe's queue drains
        solo_s = []
        for i in range(solo):
            sent = time.perf_counter()
            if (await finalize(clients[last], image, 10**6 + i, strength, steps))[0] == "ok":
                solo_s.append(time.perf_counter() - sent)
        solo_median_s = statistics.median(solo_s) if solo_s else float("nan")
        slo = slo_s if slo_s is not None else solo_median_s + max_wait_s
        total_weight = sum(weights.values())
        rates = {t: capacity_rps * weights[t] / total_weight * x_share[t] for t in keys}
        outcomes = await offered_load(clients, rates, duration_s, image, strength, steps, seed)
    finally:
        for client in clients.values():
            await client.aclose()
    return {
        "capacity_rps": round(capacity_rps, 3),
        "solo_latency_s": round(solo_median_s, 3),
        "slo_s": round(slo, 3),
        "duration_s": duration_s,
        "offered_rps": {t: round(r, 3) for t, r in rates.items()},
        "tenants": {t: summarize(outcomes, t, x_share[t], slo) for t in keys},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusionx bench tenants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server with the two keys (default: start the local app)")
    parser.add_argument("--config", help="serve config of the local application (default: embedded CPU)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--key-a", default="tenant-a-key")
    parser.add_argument("--key-b", default="tenant-b-key")
    parser.add_argument("--a-x-share", type=float, default=5.0, help="A's offered load / its share")
    parser.add_argument("--b-x-share", type=float, default=0.5, help="B's offered load / its share")
    parser.add_argument(
        "--rate-a-per-s", type=float, help="a rate for A's key (429 beyond it); default: no rates"
    )
    parser.add_argument("--max-wait-s", type=float, default=DEFAULT_MAX_WAIT_S, help="admission_max_wait_s")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--probe-s", type=float, default=15.0)
    parser.add_argument("--probe-concurrency", type=int, default=8)
    parser.add_argument("--solo", type=int, default=5)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--slo-s", type=float, help="B's latency target (default: alone + max_wait_s)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    args = parser.parse_args(argv)
    keys = {"A": args.key_a, "B": args.key_b}
    x_share = {"A": args.a_x_share, "B": args.b_x_share}
    weights = {"A": 1.0, "B": 1.0}
    stop = None
    url = args.url
    if url is None:
        from deployments.local import start_local_app, stop_local_app

        entries = [{"key": key, "weight": weights[t]} for t, key in keys.items()]
        if args.rate_a_per_s:
            entries[0]["rate_per_s"] = args.rate_a_per_s
        overrides = {"api_keys": entries, "admission_max_wait_s": args.max_wait_s}
        print("starting Ray Serve ...", file=sys.stderr, flush=True)
        url, stop = start_local_app(args.config, port=args.port, overrides=overrides), stop_local_app
    try:
        result = asyncio.run(
            run(
                url,
                keys,
                x_share,
                weights,
                args.max_wait_s,
                args.duration_s,
                args.probe_s,
                args.probe_concurrency,
                args.solo,
                args.strength,
                args.steps,
                args.slo_s,
            )
        )
    finally:
        if stop is not None:
            stop()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
