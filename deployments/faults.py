"""Fault injection on a live local application: SIGKILL every replica of one deployment while client
sessions run, and count the sessions that failed (the reliability contract says: none).

A session is what a user does: a preview, an edit of it, and the final refinement, through
`clients.DiffusionXClient` (with its retries). `diffusionx bench faults` starts the application (the
embedded CPU config unless `--config`), runs the experiment for every deployment, prints one row each and
writes the rows to `--out`/faults.json (default `bench_results/faults/`); the test suite runs a short
version on its session's application. With `--node cloud|edge [--drain]` it loses a whole node of a
multi-node cluster instead (`deployments.node_faults`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from deployments.replica_memory import replica_pids
from diffusionx.experiments.outputs import bench_results_dir

DEPLOYMENTS = ("EdgePreviewer", "StrengthPredictor", "CloudRefiner", "DiffusionXIngress", "SharedState")


def kill_replicas(deployment: str) -> list[int]:
    """SIGKILLs every live replica process of `deployment`; returns their pids."""
    pids = replica_pids(deployment)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def run_session(client: Any, index: int, refine_steps: int) -> None:
    session = client.session(seed=index)
    session.preview(f"a red circle on the left, blue background {index}")
    session.preview("a green circle on the left, blue background", edit_strength=0.5)
    session.finalize(num_inference_steps=refine_steps)


def sessions_under_kill(
    url: str,
    deployment: str,
    sessions: int = 48,
    threads: int = 16,
    kill_after_s: float = 3.0,
    refine_steps: int = 20,
    client_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs `sessions` sessions from `threads` threads and kills every replica of `deployment`
    `kill_after_s` into the run. Returns the counts and the errors of the failed sessions by type."""
    from clients import DiffusionXClient

    errors: Counter[str] = Counter()
    lock = threading.Lock()
    killed: list[int] = []

    def one(index: int) -> None:
        with DiffusionXClient(url, **(client_options or {})) as client:
            try:
                run_session(client, index, refine_steps)
            except Exception as error:
                with lock:
                    errors[f"{type(error).__name__}: {str(error)[:80]}"] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(one, i) for i in range(sessions)]
        time.sleep(kill_after_s)
        in_flight = sum(not f.done() for f in futures)
        killed = kill_replicas(deployment)
        for future in futures:
            future.result()
    return {
        "deployment": deployment,
        "replicas_killed": len(killed),
        "sessions": sessions,
        "in_flight_at_kill": in_flight,
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def wait_until_serving(url: str, deployment: str, timeout_s: float = 120.0) -> None:
    """Waits until the deployment has a live replica again and a preview succeeds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if replica_pids(deployment):
            try:
                response = httpx.post(f"{url}/v1/preview", json={"prompt": "a dot", "seed": 1}, timeout=30)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"{deployment} did not come back within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--node" in argv or any(a.startswith("--node=") for a in argv):  # a lost node, not replicas
        from deployments.node_faults import main as node_main

        return node_main(argv)
    parser = argparse.ArgumentParser(prog="diffusionx bench faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="serve config YAML (default: the embedded CPU application)")
    parser.add_argument("--port", type=int, default=8000, help="port of the local application (default 8000)")
    parser.add_argument("--sessions", type=int, default=48, help="sessions per deployment (default 48)")
    parser.add_argument("--threads", type=int, default=16, help="sessions in flight at once (default 16)")
    parser.add_argument(
        "--kill-after-s", type=float, default=3.0, help="seconds of load before the kill (default 3)"
    )
    parser.add_argument(
        "--refine-steps", type=int, default=20, help="schedule steps of each session's refine (default 20)"
    )
    parser.add_argument(
        "--deployments",
        nargs="*",
        default=list(DEPLOYMENTS),
        help=f"deployments to kill, one after another (default: all: {' '.join(DEPLOYMENTS)})",
    )
    parser.add_argument(
        "--out", default=bench_results_dir("faults"), help="output directory (default bench_results/faults/)"
    )
    args = parser.parse_args(argv)
    from deployments.local import start_local_app, stop_local_app

    rows = []
    try:
        url = start_local_app(args.config, port=args.port)
        for deployment in args.deployments:
            row = sessions_under_kill(
                url, deployment, args.sessions, args.threads, args.kill_after_s, args.refine_steps
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
            wait_until_serving(url, deployment)
    finally:
        stop_local_app()
    path = Path(args.out) / "faults.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {path}")
    return 0 if all(row["failed"] == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
