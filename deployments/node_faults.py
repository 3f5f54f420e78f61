"""`diffusionx bench faults --node cloud|edge [--drain]`: a node lost under client sessions, on Ray's own
multi-node test cluster (`ray.cluster_utils.Cluster`: a head node, two cloud nodes and one edge node,
carrying the tier resources of `serve_config_autoscale.yaml`, each tier at two replicas).

While `--threads` client threads run sessions back to back (preview, edit, finalize, through
`clients.DiffusionXClient` with its retries), `--fault-after-s` into the run one node goes:

- abrupt (default): `Cluster.remove_node(allow_graceful=False)` kills its raylet and every process on it,
  as when a spot VM vanishes. For `cloud`, the node holding the most cloud replicas goes (the other cloud
  node has room for the replacements); for `edge`, the only edge node goes, and a replacement edge node
  joins `--replace-after-s` later (as a cloud provider or KubeRay replaces a lost VM; until then the edge
  tier has nowhere to run).
- `--drain`: preemption with notice, the way KubeRay and Ray's autoscaler signal it: Ray's drain API
  (`GcsClient.drain_node`, reason PREEMPTION, deadline `--deadline-s` ahead; `ray drain-node` calls the
  same). Once no Serve replica is left on the node, or at the deadline, the node is removed.

What Ray Serve does on its own: the controller sees the replicas of a dead node die (when the GCS
declares the node dead) and starts replacements wherever the deployment's resources fit; for a draining
node it starts the replacements first, then stops the old replicas gracefully (in-flight requests finish,
within `graceful_shutdown_timeout_s`), and Ray schedules nothing new onto a draining node. What the
application adds: the ingress retries a tier call whose replica died once (Serve routes it to a live
replica), and the client retries 5xx, 503 (after Retry-After) and connection errors with backoff, so an
abrupt loss costs retries but no session.

Counted: `sessions` run, `lost` (a session whose call failed after every retry), `failed_requests` (every
failed attempt, retried or not, as the client logs them) and `recovery_s`, the time from the fault until
the tier runs its full replica count again, none on the lost node (Serve's status and the GCS actor
table). `--json` prints the result as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections import Counter
from typing import Any

from deployments.faults import run_session

PORT = 8127
TIER = {"cloud": "CloudRefiner", "edge": "EdgePreviewer"}
APP = "diffusionx"
REPLICAS = 2  # per tier: a lost node leaves the tier degraded, not gone (cloud), or measures a gap (edge)


class FailedAttempts(logging.Handler):
    """Counts the client's failed attempts (it logs one line before each retry)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self.kinds: Counter[str] = Counter()
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if "failed" in record.getMessage():
            with self._lock:
                self.count += 1
                args: Any = record.args
                self.kinds[str(args[1])[:80] if args else "?"] += 1


def replica_nodes(deployment: str) -> list[str]:
    """Node ids of the live replicas of `deployment`, from the GCS actor table."""
    from ray._private.state import actors

    return [
        info["Address"]["NodeID"]
        for info in actors().values()
        if info["State"] == "ALIVE" and info["ActorClassName"] == f"ServeReplica:{APP}:{deployment}"
    ]


def running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(APP)
    if status is None or deployment not in status.deployments:
        return 0
    states: Any = status.deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def at_full_strength(deployment: str, lost_node: str) -> bool:
    nodes = replica_nodes(deployment)
    return len(nodes) >= REPLICAS and lost_node not in nodes and running_replicas(deployment) >= REPLICAS


def start_cluster(port: int, overrides: dict[str, Any]) -> tuple[Any, dict[str, list[Any]], str]:
    """The cluster (head, 2 cloud, 1 edge node), Serve on it, the application deployed; returns the
    cluster, its worker nodes by tier and the application's URL."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.serve._private import api as serve_api

    from deployments.local import (
        AUTOSCALE_CONFIG,
        load_config,
        set_local_ray_env,
        wait_until_healthy,
    )

    fixed = {"num_replicas": REPLICAS, "autoscaling_config": None}
    config = load_config(
        AUTOSCALE_CONFIG,
        overrides,
        port=port,
        deployment_options={"EdgePreviewer": fixed, "CloudRefiner": fixed},
    )
    set_local_ray_env()  # inherited by every node's raylet and workers
    cluster = Cluster()
    nodes: dict[str, list[Any]] = {"cloud": [], "edge": []}
    try:
        cluster.add_node(num_cpus=2, resources={"head_node": 1})
        for _ in range(2):  # room for two cloud replicas each: one node can take over the other's
            nodes["cloud"].append(cluster.add_node(num_cpus=2, resources={"cloud_node": REPLICAS}))
        nodes["edge"].append(cluster.add_node(num_cpus=2, resources={"edge_node": REPLICAS}))
        ray.init(address=cluster.address, namespace=APP, logging_level=logging.WARNING)
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(), proxy_location=config.proxy_location
        )
        client.deploy_apps(config, _blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, timeout_s=300)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster, nodes, url


def stop_cluster(cluster: Any) -> None:
    """Serve, the driver's connection and every node this cluster started (only this cluster's)."""
    import ray

    from deployments.local import stop_local_app

    stop_local_app()
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node, allow_graceful=False)
    if cluster.head_node is not None:
        cluster.remove_node(cluster.head_node, allow_graceful=False)
    services: Any = ray._private.services
    services.find_gcs_addresses.cache_clear()


def drain(cluster: Any, node: Any, deadline_s: float) -> None:
    """Ray's drain API: the node will be preempted in `deadline_s` (what KubeRay / the autoscaler send)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    raylet: Any = ray._raylet
    reasons: Any = vars(autoscaler_pb2)["DrainNodeReason"]  # generated protobuf: no stubs
    gcs = raylet.GcsClient(address=cluster.address)
    accepted, why = gcs.drain_node(
        node.node_id,
        reasons.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot instance preempted (diffusionx bench faults)",
        int((time.time() + deadline_s) * 1000),
    )
    if not accepted:
        raise RuntimeError(f"drain of node {node.node_id} refused: {why}")


def run(
    cluster: Any,
    nodes: dict[str, list[Any]],
    url: str,
    tier: str,
    drain_notice: bool,
    sessions: int = 48,
    threads: int = 8,
    fault_after_s: float = 5.0,
    replace_after_s: float = 5.0,
    deadline_s: float = 60.0,
    refine_steps: int = 10,
    recovery_timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Sessions from `threads` threads, back to back, until at least `sessions` ran and the tier has
    recovered; the node of `tier` goes `fault_after_s` into the run."""
    from clients import DiffusionXClient

    deployment = TIER[tier]
    victim = max(nodes[tier], key=lambda n: replica_nodes(deployment).count(n.node_id))
    on_victim = replica_nodes(deployment).count(victim.node_id)
    attempts = FailedAttempts()
    client_logger = logging.getLogger("clients.client")
    client_logger.addHandler(attempts)
    client_logger.setLevel(logging.INFO)
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    done = threading.Event()  # the tier recovered: threads finish once enough sessions ran
    counter = iter(range(10**9))
    ran = 0

    def worker() -> None:
        nonlocal ran
        with DiffusionXClient(url) as client:
            while not (done.is_set() and ran >= sessions):
                index = next(counter)
                try:
                    run_session(client, index, refine_steps)
                except Exception as error:
                    with lock:
                        errors[f"{type(error).__name__}: {str(error)[:80]}"] += 1
                with lock:
                    ran += 1

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    time.sleep(fault_after_s)
    fault_at = time.monotonic()
    replaced = False
    if drain_notice:
        drain(cluster, victim, deadline_s)
        if tier == "edge":  # the provider starts the replacement on notice
            nodes["edge"].append(cluster.add_node(num_cpus=2, resources={"edge_node": REPLICAS}))
            replaced = True
        while time.monotonic() - fault_at < deadline_s and replica_nodes(deployment).count(victim.node_id):
            time.sleep(0.5)
        moved_s = time.monotonic() - fault_at
    cluster.remove_node(victim, allow_graceful=False)
    nodes[tier].remove(victim)
    removed_s = time.monotonic() - fault_at
    recovery_s = None
    while time.monotonic() - fault_at < recovery_timeout_s:
        if tier == "edge" and not replaced and time.monotonic() - fault_at >= replace_after_s:
            nodes["edge"].append(cluster.add_node(num_cpus=2, resources={"edge_node": REPLICAS}))
            replaced = True
        if at_full_strength(deployment, victim.node_id):
            recovery_s = time.monotonic() - fault_at
            break
        time.sleep(0.25)
    done.set()
    for thread in pool:
        thread.join()
    client_logger.removeHandler(attempts)
    return {
        "node": tier,
        "drain": drain_notice,
        "sessions": ran,
        "lost": sum(errors.values()),
        "failed_requests": attempts.count + sum(errors.values()),  # retried ones + each lost one's last
        "recovery_s": None if recovery_s is None else round(recovery_s, 1),
        "replicas_on_node": on_victim,
        "node_removed_after_s": round(removed_s, 1),
        **({"replicas_moved_after_s": round(moved_s, 1)} if drain_notice else {}),
        "replacement_node": replaced,
        "errors": dict(errors),
        "failed_attempts": dict(attempts.kinds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusionx bench faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", choices=sorted(TIER), required=True, help="the tier whose node goes")
    parser.add_argument("--drain", action="store_true", help="preemption with notice (Ray's drain API)")
    parser.add_argument("--sessions", type=int, default=48, help="at least this many sessions (default 48)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--fault-after-s", type=float, default=5.0)
    parser.add_argument("--replace-after-s", type=float, default=5.0, help="edge: replacement node joins")
    parser.add_argument("--deadline-s", type=float, default=60.0, help="drain: the preemption deadline")
    parser.add_argument("--refine-steps", type=int, default=10)
    parser.add_argument("--edge-model", default="tiny-random-edge")
    parser.add_argument("--cloud-model", default="tiny-random")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    args = parser.parse_args(argv)
    overrides = {"edge_model": args.edge_model, "cloud_model": args.cloud_model}
    print("starting a local 4-node Ray cluster ...", file=sys.stderr, flush=True)
    cluster, nodes, url = start_cluster(args.port, overrides)
    try:
        result = run(
            cluster,
            nodes,
            url,
            args.node,
            args.drain,
            args.sessions,
            args.threads,
            args.fault_after_s,
            args.replace_after_s,
            args.deadline_s,
            args.refine_steps,
        )
    finally:
        stop_cluster(cluster)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if result["lost"] == 0 and result["recovery_s"] is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
