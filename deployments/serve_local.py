"""`diffusionx serve [--config FILE]`: serve an application on 127.0.0.1 until interrupted."""

from __future__ import annotations

import argparse
import time

from deployments.local import (
    METRICS_PORT,
    embedded_models_available,
    start_local_app,
    stop_local_app,
    stop_on_signals,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusionx serve", description=__doc__)
    parser.add_argument("--config", help="serve config YAML (default: the embedded CPU application)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=METRICS_PORT,
        help=f"local port of the Prometheus metrics (Ray's and diffusionx_*; default {METRICS_PORT})",
    )
    args = parser.parse_args(argv)
    if args.config is None and not embedded_models_available():
        print("embedded shapes weights not found: serving tiny-random (noise images) instead")
    print("starting Ray Serve ...", flush=True)
    with stop_on_signals():  # SIGTERM stops like Ctrl-C: Ray is shut down, no process remains
        try:
            url = start_local_app(args.config, port=args.port, metrics_port=args.metrics_port)
            print(
                f"serving on {url}  (OpenAPI: {url}/docs, stats: {url}/v1/stats); Ctrl-C to stop", flush=True
            )
            print(f"Prometheus metrics: http://127.0.0.1:{args.metrics_port}/metrics", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt as stop:
            print(f"\nstopping ({stop or 'SIGINT'}) ...", flush=True)
        finally:
            stop_local_app()
    return 0
