"""`diffusionx bench state-memory [--previews 10000]`: memory of the shared state after N previews.

Runs the SharedState deployment's class in this process (no cluster needed: it is plain Python behind
`@serve.deployment`), stores N synthetic preview PNGs through its `put_preview` (random pixels: PNG cannot
compress them, the worst case for the byte bound) and reports what the cache accounts for, what Python
allocated (tracemalloc) and the process's resident memory growth; prints it and writes it to
`--out`/state_memory.json (default `bench_results/state-memory/`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from deployments.app import deployment
from deployments.replica_memory import MIB, memory_mib
from deployments.state import SharedState
from diffusionx.app_config import AppArgs
from diffusionx.experiments.outputs import bench_results_dir
from diffusionx.imaging import encode_png


def synthetic_pngs(count: int, side: int, seed: int = 0) -> list[bytes]:
    """`count` distinct-enough PNGs: a few random images, each varied by one pixel."""
    rng = np.random.default_rng(seed)
    bases = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(8)]
    pngs = []
    for index in range(count):
        pixels = bases[index % len(bases)].copy()
        pixels[0, 0] = (index % 256, (index // 256) % 256, 0)
        pngs.append(encode_png(Image.fromarray(pixels)))
    return pngs


async def measure(previews: int, side: int, cache_bytes: int, ttl_s: float) -> dict:
    import os

    pngs = synthetic_pngs(previews, side)
    rss_before = memory_mib(os.getpid())["rss"]
    tracemalloc.start()
    state_class = deployment(SharedState).func_or_class  # the class itself (typed as class or import path)
    assert not isinstance(state_class, str)
    state = state_class(cache_bytes, ttl_s)
    started = time.perf_counter()
    # a fresh copy of each PNG, as one that arrived from an ingress replica would be (and so traced here)
    ids = [await state.put_preview(bytes(bytearray(png))) for png in pngs]
    put_s = time.perf_counter() - started
    del pngs  # the cache now holds the only references to the kept PNGs
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stats = (await state.stats())["preview_cache"]
    return {
        "previews": previews,
        "png_side": side,
        "preview_cache_bytes": cache_bytes,
        "kept": stats["size"],
        "evicted": stats["evictions"],
        "cache_accounted_mib": round(stats["bytes"] / MIB, 1),
        "python_allocated_mib": round(current / MIB, 1),
        "python_peak_mib": round(peak / MIB, 1),
        "rss_growth_mib": round(memory_mib(os.getpid())["rss"] - rss_before, 1),
        "put_us_per_preview": round(put_s / previews * 1e6, 1),
        "last_id_resolves": await state.get_preview(ids[-1]) is not None,
    }


def main(argv: list[str] | None = None) -> int:
    defaults = AppArgs()
    parser = argparse.ArgumentParser(
        prog="diffusionx bench state-memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--previews", type=int, default=10_000, help="previews stored (default 10000)")
    parser.add_argument("--side", type=int, default=64, help="preview side in pixels (default 64)")
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=defaults.preview_cache_bytes,
        help=f"the preview cache's byte bound (default: the application's, {defaults.preview_cache_bytes})",
    )
    parser.add_argument(
        "--ttl-s",
        type=float,
        default=defaults.preview_cache_ttl_s,
        help=f"preview time to live (default: the application's, {defaults.preview_cache_ttl_s:g} s)",
    )
    parser.add_argument(
        "--out",
        default=bench_results_dir("state-memory"),
        help="output directory (default bench_results/state-memory/)",
    )
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.previews, args.side, args.cache_bytes, args.ttl_s))
    print(json.dumps(result, indent=2))
    path = Path(args.out) / "state_memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
