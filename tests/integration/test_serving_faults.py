"""Fault injection on the live local application: every replica of each deployment is SIGKILLed while
client sessions (preview, edit, finalize) run; no session may fail. The short variant runs in the default
suite on the session's application; the issue's full load (48 sessions from 16 threads) is marked slow."""

from __future__ import annotations

import json

import pytest

from deployments.faults import DEPLOYMENTS, sessions_under_kill, wait_until_serving

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_killing_every_replica_of_a_deployment_loses_no_session(serve_url, deployment):
    wait_until_serving(serve_url, deployment)
    row = sessions_under_kill(serve_url, deployment, sessions=12, threads=6, kill_after_s=0.8)
    assert row["replicas_killed"] >= 1, row
    assert row["in_flight_at_kill"] > 0, row  # the kill hit sessions in flight
    assert row["failed"] == 0, json.dumps(row)  # a string: pytest shows it whole, errors included
    wait_until_serving(serve_url, deployment)


@pytest.mark.slow
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_full_load_kill_loses_no_session(serve_url, deployment):
    wait_until_serving(serve_url, deployment)
    row = sessions_under_kill(serve_url, deployment, sessions=48, threads=16, kill_after_s=3.0)
    assert row["failed"] == 0 and row["in_flight_at_kill"] > 0, row
    wait_until_serving(serve_url, deployment)
