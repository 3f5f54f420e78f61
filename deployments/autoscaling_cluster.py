"""Ray's local autoscaling cluster with fake edge and cloud node types, and what a bench reads from it.

`ray.cluster_utils.AutoscalingCluster` starts a head node whose Ray autoscaler launches fake worker nodes
(raylets on this machine) of the configured types when tasks or actors need their resources, and removes
them when idle. The node types carry the tier resources of `serve_config_autoscale.yaml` (`cloud_node`,
`edge_node`), so a cloud replica that Serve adds makes the autoscaler add a cloud node, never an edge one.

The installed Ray wheel lacks the fake provider's `example.yaml` that `AutoscalingCluster` reads its base
config from, so `LocalAutoscalingCluster` supplies the same settings (fake_multinode provider, no node
updaters) in code. With `node_start_delay_s` the provider is Ray's fake one with a cloud's node start-up
time (`deployments.delayed_node_provider`).

Start and stop are this module's, not `AutoscalingCluster`'s: that class runs `ray stop --force` at both,
which kills every Ray process of the user on the machine, other people's clusters included. Here the head
runs as `ray start --head --block` in a session of its own; stopping ends that process and then only the
processes of its session and its descendants (the GCS, raylets, autoscaler, the fake nodes and workers).
If a Ray cluster already listens on the GCS port, starting refuses and says so.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.cluster_utils import AutoscalingCluster

OBJECT_STORE_BYTES = 200 * 1024 * 1024

# Node types (resources per fake node), as on a GPU cluster (serve_config.yaml): a cloud node is one GPU and
# holds one cloud replica (1 GPU, 1 `cloud_node`), so cloud nodes follow cloud replicas one for one, up to
# CloudRefiner's max_replicas; an edge node holds up to four edge replicas (a quarter GPU each), up to
# EdgePreviewer's max_replicas. Each node declares 1 CPU (a replica asks for 0.5 and waits for its GPU time).
# One node of each type is the group's minimum (`min_workers`, a KubeRay worker group's `minReplicas`): the
# tiers' minimum replicas always need it, so it is launched with the head rather than when Serve first
# places a replica, and it is never given back.
HEAD_RESOURCES = {"CPU": 2, "head_node": 1}
CLOUD_MAX_REPLICAS = 4
EDGE_REPLICAS_PER_NODE = 4
NODE_TYPES: dict[str, dict[str, Any]] = {
    "cloud": {
        "resources": {"CPU": 1, "cloud_node": 1, "object_store_memory": OBJECT_STORE_BYTES},
        "node_config": {},
        "min_workers": 1,
        "max_workers": CLOUD_MAX_REPLICAS,
    },
    "edge": {
        "resources": {
            "CPU": 2,
            "edge_node": EDGE_REPLICAS_PER_NODE,
            "object_store_memory": OBJECT_STORE_BYTES,
        },
        "node_config": {},
        "min_workers": 1,
        "max_workers": 1,
    },
}
IDLE_TIMEOUT_MINUTES = 0.1  # a node with nothing on it for 6 s goes away (Ray's fake provider default)

# what `fake_multi_node/example.yaml` holds besides the node types (Ray's own defaults for this provider)
_BASE_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


GCS_PORT = 6379  # the fake provider's nodes join the head there
# seconds the cluster's processes get to exit on SIGTERM before SIGKILL (`ray stop` gives its own 10 s;
# this cluster is thrown away, and a raylet that drains would only delay the next policy's cluster)
STOP_GRACE_S = 5.0
DELAYED_PROVIDER = "deployments.delayed_node_provider.DelayedFakeProvider"


class LocalAutoscalingCluster(AutoscalingCluster):
    def __init__(self, head_resources: dict, worker_node_types: dict, node_start_delay_s: float = 0.0, **kw):
        super().__init__(head_resources, worker_node_types, **kw)
        if node_start_delay_s > 0:
            self._config["provider"].update(
                {"type": "external", "module": DELAYED_PROVIDER, "node_start_delay_s": node_start_delay_s}
            )
        self._head: subprocess.Popen | None = None

    def start(self, _system_config=None, override_env: dict | None = None) -> None:
        """`ray start --head --block` in its own session, with the autoscaler on this config."""
        with socket.socket() as probe:
            if probe.connect_ex((gcs_host(), GCS_PORT)) == 0:
                raise RuntimeError(
                    f"a Ray cluster already listens on port {GCS_PORT}: this bench starts its own and stops "
                    "only what it started; stop that cluster first (it may be someone else's)"
                )
        fd, path = tempfile.mkstemp(prefix="diffusionx-autoscale-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self._config, f)
        resources = dict(self._head_resources)
        cmd = ["ray", "start", "--head", "--block", f"--port={GCS_PORT}", f"--autoscaling-config={path}"]
        cmd.append(f"--num-cpus={resources.pop('CPU')}")
        env = {
            **os.environ,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            **(override_env or {}),
        }
        self._log = open(f"{path}.log", "w")  # noqa: SIM115 (open for the head's lifetime)
        self._head = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            if self._head.poll() is not None:
                raise RuntimeError(
                    f"`ray start --head` exited with {self._head.returncode}: see {self._log.name}"
                )
            with socket.socket() as probe:
                if probe.connect_ex((gcs_host(), GCS_PORT)) == 0:
                    time.sleep(2.0)  # the GCS listens before the raylet has registered
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray head did not come up within 120 s: see {self._log.name}")

    def shutdown(self) -> None:
        """Ends the head this object started and every process of its session or below it, nothing else."""
        import psutil

        if self._head is None:
            return
        head, self._head = self._head, None
        session = head.pid  # started with start_new_session: the head leads its own session
        # as `ray stop` does, but only for these: SIGTERM to every process, then SIGKILL to what is left
        started = _processes_of(head.pid, session)
        with contextlib.suppress(psutil.Error):
            started.append(psutil.Process(head.pid))
        for process in started:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(started, timeout=STOP_GRACE_S)
        for process in alive + _processes_of(head.pid, session):
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5.0)
        self._log.close()

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = copy.deepcopy(_BASE_CONFIG)
        config["available_node_types"] = copy.deepcopy(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {
            "resources": head_resources,
            "node_config": {},
            "max_workers": 0,
        }
        config.update(config_kwargs)
        return config


def gcs_host() -> str:
    """The address the head's GCS listens on (the node IP, as the fake provider's nodes use it)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _processes_of(root_pid: int, session: int) -> list:
    """The processes below `root_pid` and those of session `session` (never this process)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        for process in psutil.Process(root_pid).children(recursive=True):
            found[process.pid] = process
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if process.pid != os.getpid() and os.getsid(process.pid) == session:
                found[process.pid] = process
    return list(found.values())


def start_cluster(node_start_delay_s: float = 0.0) -> LocalAutoscalingCluster:
    """Starts the head (whose autoscaler adds edge/cloud nodes on demand, each `node_start_delay_s` after
    it is asked for) and connects this process."""
    import ray

    # `ray start` runs from PATH: make it this environment's
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster = LocalAutoscalingCluster(
        head_resources=dict(HEAD_RESOURCES),
        worker_node_types=NODE_TYPES,
        node_start_delay_s=node_start_delay_s,
        idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
    )
    # custom head resources go through Ray's RAY_OVERRIDE_RESOURCES (`ray start --resources` would need
    # shell quoting)
    custom = {k: v for k, v in HEAD_RESOURCES.items() if k != "CPU"}
    cluster._head_resources = {"CPU": HEAD_RESOURCES["CPU"]}
    try:
        # `ray start` turns token authentication on where `ray.init` (this process, Ray already imported) has
        # it off; the bench's cluster runs like `ray.init`'s local ones, without
        env = {"RAY_OVERRIDE_RESOURCES": json.dumps(custom), "RAY_AUTH_MODE": "disabled"}
        cluster.start(override_env=env)
        ray.init(address=f"{gcs_host()}:{GCS_PORT}", namespace="diffusionx", logging_level=logging.WARNING)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def stop_cluster(cluster: LocalAutoscalingCluster) -> None:
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    finally:
        cluster.shutdown()  # the head, autoscaler and fake nodes it started, nothing else


@dataclass
class ClusterSample:
    """Running replicas per tier, replicas Serve has asked for (running or on their way: pending a node,
    starting), and alive nodes (head included; by type in `nodes_by_type`)."""

    replicas: dict[str, int]
    nodes: int
    nodes_by_type: dict[str, int]
    asked: dict[str, int]


TIER_DEPLOYMENTS = {"edge": "EdgePreviewer", "cloud": "CloudRefiner", "predictor": "StrengthPredictor"}


def sample_cluster(app: str = "diffusionx") -> ClusterSample:
    """What Serve and the GCS say now: replicas of each tier running and asked for, alive nodes."""
    import ray
    from ray import serve
    from ray.serve.schema import ReplicaState

    status = serve.status().applications.get(app)
    replicas, asked = {}, {}
    leaving = (ReplicaState.STOPPING, ReplicaState.STOPPED)
    for tier, name in TIER_DEPLOYMENTS.items():
        deployment = status.deployments.get(name) if status is not None else None
        states = deployment.replica_states if deployment else {}
        replicas[tier] = int(states.get(ReplicaState.RUNNING, 0))
        asked[tier] = sum(int(n) for state, n in states.items() if state not in leaving)
    alive = [node for node in ray.nodes() if node.get("Alive")]
    by_type = {"head": 0, "cloud": 0, "edge": 0}
    for node in alive:
        resources = node.get("Resources", {})
        kind = "cloud" if "cloud_node" in resources else "edge" if "edge_node" in resources else "head"
        by_type[kind] += 1
    return ClusterSample(replicas=replicas, nodes=len(alive), nodes_by_type=by_type, asked=asked)
