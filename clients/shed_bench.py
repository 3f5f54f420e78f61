"""`diffusionx bench shed`: how fast overload is refused. Sends `--requests` refinements at once
(default 400), `--bursts` times (default 3), and reports for each burst the median latency
of the 503 answers against the median latency of the admitted ones (the target: the 503s arrive in under
a tenth of the admitted latency), the load factor (requests sent / admitted), who refused (admission
control or a tier's bounded queue) and whether every 503 carried Retry-After.

Targets `--url`, or starts the local application (default: the embedded CPU config) and stops it after.
The burst is not retried: the server's own decision is measured. Prints the result and writes it to
`--out`/shed.json (default `bench_results/shed/`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from clients.client import AsyncDiffusionXClient
from diffusionx.experiments.outputs import bench_results_dir
from diffusionx.policy.admission import REFUSAL_MARK


async def warm_up(client: AsyncDiffusionXClient, steps: int, strength: float, warmup: int) -> str:
    """A preview to refine, then `warmup` refinements: the cloud tier measures its step time (admission
    control needs it). Returns the preview's base64 PNG."""
    preview = await client.preview("a red circle on the left, blue background", seed=1)
    for i in range(warmup):
        await client.refine(
            "a red circle", image=preview.image_base64, seed=i, strength=strength, num_inference_steps=steps
        )
    return preview.image_base64


async def burst(session: aiohttp.ClientSession, bodies: list[bytes]) -> dict[str, Any]:
    """Sends every body at once; the counts, medians and sources of one burst."""

    async def one(body: bytes) -> tuple[str, float, bool, str]:
        started = time.perf_counter()
        try:
            async with session.post(
                "/v1/refine", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                text = await response.text()
                seconds = time.perf_counter() - started
                if response.status == 200:
                    return "ok", seconds, True, ""
                kind = "503" if response.status == 503 else f"HTTP {response.status}"
                return kind, seconds, "Retry-After" in response.headers, text
        except aiohttp.ClientError as error:
            return type(error).__name__, time.perf_counter() - started, False, str(error)

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one(body) for body in bodies))
    wall_s = time.perf_counter() - started
    admitted = [s for kind, s, _, _ in outcomes if kind == "ok"]
    shed = [s for kind, s, _, _ in outcomes if kind == "503"]
    other = [kind for kind, _, _, _ in outcomes if kind not in ("ok", "503")]
    # who refused: admission control at the door, or a tier's own bounded queue (Serve's backpressure)
    by_source: dict[str, list[float]] = {}
    for kind, seconds, _, message in outcomes:
        if kind == "503":
            source = "admission" if REFUSAL_MARK in message else "tier_queue"
            by_source.setdefault(source, []).append(seconds)
    median_admitted = statistics.median(admitted) if admitted else None
    median_shed = statistics.median(shed) if shed else None
    return {
        "admitted": len(admitted),
        "shed_503": len(shed),
        "other_errors": len(other),
        "load_factor": round(len(bodies) / max(1, len(admitted)), 1),
        "median_admitted_s": None if median_admitted is None else round(median_admitted, 3),
        "median_503_s": None if median_shed is None else round(median_shed, 4),
        "ratio_503_to_admitted": (
            None if not (median_admitted and median_shed) else round(median_shed / median_admitted, 4)
        ),
        "shed_by_source": {
            source: {"count": len(times), "median_s": round(statistics.median(times), 4)}
            for source, times in sorted(by_source.items())
        },
        "all_503_have_retry_after": all(ok for kind, _, ok, _ in outcomes if kind == "503"),
        "wall_s": round(wall_s, 1),
    }


async def run(
    url: str, requests: int, steps: int, strength: float, warmup: int, bursts: int, pause_s: float
) -> dict[str, Any]:
    """`bursts` bursts of `requests` refinements, `pause_s` apart (each starts after the last one's
    admitted work is done). The first burst on a freshly started server also pays for the connections
    HAProxy opens to the ingress replica (it keeps them open for the next ones), so it is reported apart."""
    async with AsyncDiffusionXClient(url, 600.0, max_retries=0) as client:
        image = await warm_up(client, steps, strength, warmup)
    bodies = [
        json.dumps(
            {
                "prompt": "a red circle",
                "image": image,
                "seed": i,
                "strength": strength,
                "num_inference_steps": steps,
            }
        ).encode()
        for i in range(requests)
    ]
    # The burst goes out through aiohttp, not the project's httpx client: httpx's pool costs
    # O(connections) per request, so with hundreds of connections the client, not the server's decision,
    # would set the latency of a 503.
    results = []
    connector = aiohttp.TCPConnector(limit=requests, force_close=True)  # every burst: new connections
    timeout = aiohttp.ClientTimeout(total=600.0)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        for index in range(bursts):
            if index:
                await asyncio.sleep(pause_s)  # the tiers' load reports catch up with the drained queue
            results.append(await burst(session, bodies))
    ratios = [r["ratio_503_to_admitted"] for r in results if r["ratio_503_to_admitted"] is not None]
    return {
        "requests": requests,
        "refine_steps": steps,
        "strength": strength,
        "bursts": results,
        "ratio_first_burst": results[0]["ratio_503_to_admitted"],
        "ratio_median_over_bursts": round(statistics.median(ratios), 4) if ratios else None,
        "all_503_have_retry_after": all(r["all_503_have_retry_after"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusionx bench shed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start the local application)")
    parser.add_argument("--config", help="serve config for the local application (default: embedded CPU app)")
    parser.add_argument("--port", type=int, default=8000, help="port of the local application (default 8000)")
    parser.add_argument("--requests", type=int, default=400, help="refinements sent at once per burst (400)")
    parser.add_argument("--steps", type=int, default=20, help="refine schedule steps (default 20)")
    parser.add_argument("--strength", type=float, default=0.5, help="refine strength (default 0.5)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="refinements first, one at a time, unrecorded (default 3)"
    )
    parser.add_argument("--bursts", type=int, default=3, help="bursts, one after another (default 3)")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between bursts (default 3)")
    parser.add_argument(
        "--out", default=bench_results_dir("shed"), help="output directory (default bench_results/shed/)"
    )
    args = parser.parse_args(argv)
    stop = None
    url = args.url
    if url is None:
        from deployments.local import start_local_app, stop_local_app

        url, stop = start_local_app(args.config, port=args.port), stop_local_app
    try:
        result = asyncio.run(
            run(url, args.requests, args.steps, args.strength, args.warmup, args.bursts, args.pause)
        )
    finally:
        if stop is not None:
            stop()
    print(json.dumps(result, indent=2))
    path = Path(args.out) / "shed.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
