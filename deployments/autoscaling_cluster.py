"""Ray's local autoscaling cluster with fake edge and cloud node types, and what a bench reads from it.

`ray.cluster_utils.AutoscalingCluster` starts a head node whose Ray autoscaler launches fake worker nodes
(raylets on this machine) of the configured types when tasks or actors need their resources, and removes
them when idle. The node types carry the tier resources of `serve_config_autoscale.yaml` (`cloud_node`,
`edge_node`), so a cloud replica that Serve adds makes the autoscaler add a cloud node, never an edge one.

The installed Ray wheel lacks the fake provider's `example.yaml` that `AutoscalingCluster` reads its base
config from, so `LocalAutoscalingCluster` supplies the same settings (fake_multinode provider, no node
updaters) in code; everything else is Ray's own class.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.cluster_utils import AutoscalingCluster

OBJECT_STORE_BYTES = 200 * 1024 * 1024

# Node types (resources per fake node). A tier replica asks for 0.5 CPU and 1 of its tier resource, so a
# node holds two; the cluster can grow to 2 cloud nodes (CloudRefiner max_replicas 4) and 1 edge node.
HEAD_RESOURCES = {"CPU": 2, "head_node": 1}
NODE_TYPES: dict[str, dict[str, Any]] = {
    "cloud": {
        "resources": {"CPU": 1, "cloud_node": 2, "object_store_memory": OBJECT_STORE_BYTES},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 2,
    },
    "edge": {
        "resources": {"CPU": 1, "edge_node": 2, "object_store_memory": OBJECT_STORE_BYTES},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    },
}
IDLE_TIMEOUT_MINUTES = 0.25  # a node with nothing on it for 15 s goes away

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


class LocalAutoscalingCluster(AutoscalingCluster):
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


def start_cluster() -> LocalAutoscalingCluster:
    """Starts the head (whose autoscaler adds edge/cloud nodes on demand) and connects this process."""
    import ray

    # `ray start` runs from PATH: make it this environment's
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster = LocalAutoscalingCluster(
        head_resources=dict(HEAD_RESOURCES),
        worker_node_types=NODE_TYPES,
        idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
    )
    # `start` passes custom head resources as --resources='{...}' with shell quotes but runs no shell, so
    # `ray start` cannot parse them; give them through Ray's RAY_OVERRIDE_RESOURCES instead
    custom = {k: v for k, v in HEAD_RESOURCES.items() if k != "CPU"}
    cluster._head_resources = {"CPU": HEAD_RESOURCES["CPU"]}
    cluster.start(override_env={"RAY_OVERRIDE_RESOURCES": json.dumps(custom)})
    ray.init(address="auto", namespace="diffusionx", logging_level=logging.WARNING)
    return cluster


def stop_cluster(cluster: LocalAutoscalingCluster) -> None:
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    finally:
        cluster.shutdown()  # `ray stop --force`: head, autoscaler and every fake node


@dataclass
class ClusterSample:
    """Running replicas per tier and alive nodes (head included; by type in `nodes_by_type`)."""

    replicas: dict[str, int]
    nodes: int
    nodes_by_type: dict[str, int]


TIER_DEPLOYMENTS = {"edge": "EdgePreviewer", "cloud": "CloudRefiner", "predictor": "StrengthPredictor"}


def sample_cluster(app: str = "diffusionx") -> ClusterSample:
    """What Serve and the GCS say now: RUNNING replicas of each tier, alive nodes."""
    import ray
    from ray import serve
    from ray.serve.schema import ReplicaState

    status = serve.status().applications.get(app)
    replicas = {}
    for tier, name in TIER_DEPLOYMENTS.items():
        deployment = status.deployments.get(name) if status is not None else None
        replicas[tier] = int(deployment.replica_states.get(ReplicaState.RUNNING, 0)) if deployment else 0
    alive = [node for node in ray.nodes() if node.get("Alive")]
    by_type = {"head": 0, "cloud": 0, "edge": 0}
    for node in alive:
        resources = node.get("Resources", {})
        kind = "cloud" if "cloud_node" in resources else "edge" if "edge_node" in resources else "head"
        by_type[kind] += 1
    return ClusterSample(replicas=replicas, nodes=len(alive), nodes_by_type=by_type)
