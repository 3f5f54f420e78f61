"""The node-loss harness counts every failed attempt the client retries (from the client's own log)."""

from __future__ import annotations

import logging

import httpx

from clients.client import DiffusionXClient
from deployments.node_faults import FailedAttempts


def test_every_retried_attempt_is_counted_by_kind():
    answers = iter([httpx.Response(503, json={"error": "busy", "status": 503}, headers={"Retry-After": "0"})])

    def flaky(request: httpx.Request) -> httpx.Response:
        answer = next(answers, None)
        if answer is not None:
            return answer
        return httpx.Response(200, json={"status": "ok", "edge": {}, "cloud": {}})

    counter = FailedAttempts()
    client_logger = logging.getLogger("clients.client")
    client_logger.addHandler(counter)
    client_logger.setLevel(logging.INFO)
    try:
        with DiffusionXClient("http://diffusionx.test", transport=httpx.MockTransport(flaky)) as client:
            client.health()
    finally:
        client_logger.removeHandler(counter)
    assert counter.count == 1 and "busy" in next(iter(counter.kinds))
