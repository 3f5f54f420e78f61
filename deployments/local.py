"""Run an application from a serve config on a local Ray instance (demo, `diffusionx serve`, tests).

It does what `serve run CONFIG` does (validate against Ray's ServeDeploySchema, start Serve, deploy the
config so per-deployment options apply) and then waits until `/v1/health` answers.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from diffusionx.app_config import SERVE_FAST_PATH_ENV

REPO_DIR = Path(__file__).resolve().parents[1]
# Ray exports its metrics, the application's diffusionx_* ones among them, in Prometheus format on this
# local port: http://127.0.0.1:9464/metrics (9464: the usual port of a Prometheus exporter)
METRICS_PORT = 9464
# SERVE_FAST_PATH_ENV (diffusionx.app_config) goes to every Serve process the local Ray starts: the serve
# configs' runtime_env reaches only the replicas, the proxy and HAProxy read theirs at start.
# On one machine HAProxy notices a stopping ingress replica within half a second (health checks every
# 250 ms, down after 2 failures), so a stopping replica drains for 2 s, not the 30 s meant for a cluster's
# load balancers (a local stop would wait that long).
LOCAL_DRAINING_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def shipped_config(name: str) -> Path:
    """A config that ships with the project: beside the sources (checkout, editable install), else where a
    wheel install puts it (<prefix>/share/diffusionx)."""
    for directory in (REPO_DIR, Path(sys.prefix) / "share" / "diffusionx"):
        if (directory / name).exists():
            return directory / name
    return REPO_DIR / name


CPU_CONFIG = shipped_config("serve_config_cpu.yaml")
PRODUCTION_CONFIG = shipped_config("serve_config.yaml")
AUTOSCALE_CONFIG = shipped_config("serve_config_autoscale.yaml")  # tier resources for fake node types


def embedded_models_available() -> bool:
    from diffusionx.models.registry import EMBEDDED_SHAPES_DIR

    return (EMBEDDED_SHAPES_DIR / "model_index.json").exists() and (
        EMBEDDED_SHAPES_DIR / "unet_edge"
    ).exists()


def load_config(
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    port: int = 8000,
    deployment_options: dict[str, dict[str, Any]] | None = None,
):
    """Reads a serve config, applies `overrides` to the first application's args and `deployment_options`
    (deployment name -> fields that replace the config's, e.g. an `autoscaling_config`) to its
    deployments, returns ServeDeploySchema.

    Without a path it is the embedded CPU config; if the embedded shapes weights are missing it swaps in
    tiny-random (and says so through the returned args).
    """
    from ray.serve.schema import ServeDeploySchema

    path = Path(config_path) if config_path else CPU_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"serve config {path} does not exist")
    raw = yaml.safe_load(path.read_text())
    app = raw["applications"][0]
    app.setdefault("args", {})
    if config_path is None and not embedded_models_available():
        app["args"].update({"edge_model": "tiny-random-edge", "cloud_model": "tiny-random"})
    app["args"].update(overrides or {})
    for name, options in (deployment_options or {}).items():
        deployment = next((d for d in app.get("deployments", []) if d["name"] == name), None)
        if deployment is None:
            raise ValueError(f"deployment {name!r} is not in {path}")
        deployment.update(options)
    raw.setdefault("http_options", {})["port"] = port
    return ServeDeploySchema.model_validate(raw)


def start_local_app(
    config_path: str | Path | None = None,
    port: int = 8000,
    overrides: dict[str, Any] | None = None,
    timeout_s: float = 300.0,
    num_cpus: int | None = None,
    deployment_options: dict[str, dict[str, Any]] | None = None,
    metrics_port: int = METRICS_PORT,
    metrics_report_interval_ms: int | None = None,
) -> str:
    """Starts Ray + Serve locally (or uses the Ray this process is connected to), deploys the config and
    returns the base URL once /v1/health is OK.

    Ray's metrics (with the application's) are served for Prometheus on `metrics_port`; every process
    reports them each `metrics_report_interval_ms` (Ray's default, 10 s, when None). The HTTP port listens
    on the config's `http_options.host` (127.0.0.1 in the local configs); Ray binds its own servers, the
    metrics exporter and HAProxy's stats and metrics ports on every interface (docs/exposure.md)."""
    import ray

    # Private: `serve run CONFIG`'s own path. The public `serve.run` takes an Application and would drop
    # the config's per-deployment options (replicas, resources, request router), which are the defaults.
    from ray.serve._private import api as serve_api

    config = load_config(config_path, overrides, port, deployment_options)
    prepare_models(config.applications[0].args)
    if not ray.is_initialized():
        set_local_ray_env()
        env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "DIFFUSIONX_", "OMP_"))}
        sigterm = signal.getsignal(signal.SIGTERM)
        ray.init(
            # always a Ray of its own: without an address ray.init joins the cluster named in
            # /tmp/ray/ray_current_cluster, which another (or a dead) local cluster may have left behind
            address="local",
            namespace="diffusionx",
            include_dashboard=False,
            num_cpus=num_cpus,
            runtime_env={"env_vars": env} if env else None,
            logging_level=logging.WARNING,
            # underscore options: ray.init has no public way to fix the metrics port or the report interval
            _metrics_export_port=metrics_port,
            _system_config=(
                {"metrics_report_interval_ms": metrics_report_interval_ms}
                if metrics_report_interval_ms
                else None
            ),
        )
        if sigterm is _raise_stopped:  # ray.init installs its own SIGTERM handler (sys.exit); keep ours
            signal.signal(signal.SIGTERM, _raise_stopped)
    # the config's proxy_location too (`serve deploy` passes it; without it Serve starts a proxy on every
    # node, which keeps an autoscaled worker node busy, and away from idle, while it drains)
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(), proxy_location=config.proxy_location
    )
    client.deploy_apps(config, _blocking=False)
    host = config.http_options.host if config.http_options.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{port}"
    wait_until_healthy(url, timeout_s)
    return url


# the HAProxy ports this process chose last (a user's own setting is never replaced)
_chosen_haproxy_ports: dict[str, str] = {}


# HAProxy's ports are drawn from here: below Serve's replica ports (30000 up) and the kernel's ephemeral
# range (32768 up), above Ray's worker ports (10002-19999). A port the kernel hands out (bind to 0) is an
# ephemeral one, which Ray's processes starting meanwhile may take before HAProxy binds it.
HAPROXY_PORT_RANGE = (21000, 29000)


def _free_port(taken: set[int], rng: random.Random) -> int:
    for _ in range(200):
        port = rng.randrange(*HAPROXY_PORT_RANGE)
        if port in taken:
            continue
        with socket.socket() as probe:  # HAProxy binds every interface
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port for HAProxy in {HAPROXY_PORT_RANGE}")


def haproxy_ports_env() -> dict[str, str]:
    """Free local ports for HAProxy's stats page and metrics exporter (Serve's defaults, 8404 and 9101,
    are fixed: a second local application, e.g. the tests beside `diffusionx serve`, could not start)."""
    rng = random.Random()
    stats = _free_port(set(), rng)
    metrics = _free_port({stats}, rng)
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(stats), "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics)}


def set_local_ray_env() -> None:
    """The environment every process of a Ray started from here inherits (raylets, workers, proxies):
    the fast path, local draining, and HAProxy ports free now. Called before each new local Ray: ports
    chosen for an earlier Ray may have been taken since by any process on the machine (a later Ray's
    HAProxy could then not bind and Serve would not start), so they are chosen again; variables the user
    set are kept."""
    for name, value in {**SERVE_FAST_PATH_ENV, **LOCAL_DRAINING_ENV}.items():
        os.environ.setdefault(name, value)
    for name, value in haproxy_ports_env().items():
        if name not in os.environ or os.environ[name] == _chosen_haproxy_ports.get(name):
            os.environ[name] = _chosen_haproxy_ports[name] = value


def prepare_models(args: dict[str, Any]) -> None:
    """Builds models that are built on first use (tiny-random, the *-arch pair) here, once, before the
    replicas start, instead of in every replica at once."""
    from diffusionx.models.registry import get_spec

    for key in ("edge_model", "cloud_model"):
        if args.get(key):
            get_spec(args[key])


def wait_until_healthy(url: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/v1/health", timeout=5.0)
            if response.status_code == 200:
                return
            last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            last_error = str(error)
        status = serve.status().applications.get("diffusionx")
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"application failed to deploy: {status.message}")
        time.sleep(1.0)
    raise TimeoutError(f"application at {url} not healthy after {timeout_s:.0f} s: {last_error}")


def stop_local_app() -> None:
    """Shuts Serve and the local Ray instance down (every Ray process this process started goes with it).
    SIGINT and SIGTERM are ignored meanwhile, so a second Ctrl-C cannot leave a half-stopped cluster."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stopped(KeyboardInterrupt):
    """SIGTERM arrived: handled like Ctrl-C, so the same clean-up runs."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(f"signal {signal.Signals(signum).name}")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block SIGTERM raises `Stopped` (a KeyboardInterrupt) in the main thread, as SIGINT
    raises KeyboardInterrupt, so `diffusionx serve` and `demo` stop Ray in their `finally` on either."""

    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    # A process started in the background of a non-interactive shell inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: Ctrl-C / SIGINT must stop the server all the same.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
