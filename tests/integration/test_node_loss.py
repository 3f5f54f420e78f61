"""A node lost under client sessions, on Ray's own multi-node test cluster (`deployments.node_faults`: a
head, two cloud nodes, one edge node, two replicas per tier): abruptly (raylet and every process on it
killed) no session is lost, and with Ray's drain notice (preemption) no request fails at all."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.own_ray_cluster]

PORT = 8128
TINY = {"edge_model": "tiny-random-edge", "cloud_model": "tiny-random"}


@pytest.mark.parametrize("drain", [False, True], ids=["abrupt", "drain"])
def test_a_lost_cloud_node_loses_no_session(drain):
    from deployments.local import stop_local_app
    from deployments.node_faults import run, start_cluster, stop_cluster

    stop_local_app()  # one Ray per process: end the shared app (own_ray_cluster tests run last)
    cluster, nodes, url = start_cluster(PORT, TINY)
    try:
        result = run(cluster, nodes, url, "cloud", drain, sessions=12, threads=4, fault_after_s=3.0)
    finally:
        stop_cluster(cluster)
    assert result["replicas_on_node"] >= 1  # the node that went held cloud work
    assert result["sessions"] >= 12 and result["lost"] == 0, result["errors"]
    assert result["recovery_s"] is not None  # both cloud replicas run again, none on the lost node
    if drain:
        assert result["failed_requests"] == 0, result["failed_attempts"]
