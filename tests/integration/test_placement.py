"""Placement by tier on Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`): the autoscaling
config's tier resources put cloud replicas only on cloud nodes and edge replicas only on edge nodes."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.own_ray_cluster]

PORT = 8125


def replica_nodes(deployment: str) -> list[str]:
    """Node ids of the live replicas of `deployment`, from the GCS actor table."""
    from ray._private.state import actors

    return [
        info["Address"]["NodeID"]
        for info in actors().values()
        if info["State"] == "ALIVE" and info["ActorClassName"] == f"ServeReplica:diffusionx:{deployment}"
    ]


def test_cloud_replicas_land_on_cloud_nodes_and_edge_replicas_on_edge_nodes():
    import ray
    from ray.cluster_utils import Cluster
    from ray.serve._private import api as serve_api

    from deployments.local import (
        AUTOSCALE_CONFIG,
        load_config,
        set_local_ray_env,
        stop_local_app,
        wait_until_healthy,
    )

    two = {"num_replicas": 2, "autoscaling_config": None}  # two per tier, so each could go anywhere
    config = load_config(
        AUTOSCALE_CONFIG,
        {"edge_model": "tiny-random-edge", "cloud_model": "tiny-random"},
        port=PORT,
        deployment_options={"EdgePreviewer": two, "CloudRefiner": two},
    )
    stop_local_app()  # one Ray per process: end the shared app (own_ray_cluster tests run last)
    set_local_ray_env()  # as `diffusionx serve` does: fresh HAProxy ports among them
    cluster = Cluster()
    try:
        # every node has CPUs to spare: only the tier resources keep replicas apart
        cluster.add_node(num_cpus=2, resources={"head_node": 1})
        cloud_node = cluster.add_node(num_cpus=2, resources={"cloud_node": 2})
        edge_node = cluster.add_node(num_cpus=2, resources={"edge_node": 2})
        ray.init(address=cluster.address, namespace="diffusionx", logging_level="WARNING")
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(), proxy_location=config.proxy_location
        )
        client.deploy_apps(config, _blocking=False)
        wait_until_healthy(f"http://127.0.0.1:{PORT}", timeout_s=240)
        cloud = replica_nodes("CloudRefiner")
        edge = replica_nodes("EdgePreviewer")
        assert len(cloud) == 2 and set(cloud) == {cloud_node.node_id}
        assert len(edge) == 2 and set(edge) == {edge_node.node_id}
        head = {cluster.head_node.node_id}
        for deployment in ("DiffusionXIngress", "SharedState", "StrengthPredictor"):
            assert set(replica_nodes(deployment)) == head, deployment
    finally:
        stop_local_app()
        cluster.shutdown()
