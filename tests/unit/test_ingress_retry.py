"""The ingress's tier calls (`ask`, `ask_stream`) against fake handle methods: a call or a stream whose
replica died is sent once more; twice gone is a 503 with the replacement's Retry-After. No Ray cluster."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from deployments.handles import ask, ask_stream
from diffusionx.engine.progress import PROGRESS
from diffusionx.serving.errors import REPLACEMENT_RETRY_AFTER_S, ReplicaGone, TierOverloaded


class FakeMethod:
    """A DeploymentHandle method whose first `failures` calls die with their replica."""

    def __init__(self, failures: int, result: Any = "image", steps: int = 2) -> None:
        self.failures = failures
        self.calls = 0
        self.result = result
        self.steps = steps
        self.stream = False

    def options(self, stream: bool = False) -> FakeMethod:
        self.stream = stream
        return self

    def remote(self, *args: Any) -> Any:
        self.calls += 1
        dies = self.calls <= self.failures
        return self._stream(dies) if self.stream else self._call(dies)

    async def _call(self, dies: bool) -> Any:
        if dies:
            raise ActorDiedError()
        return self.result

    async def _stream(self, dies: bool) -> Any:
        for step in range(1, self.steps + 1):
            yield PROGRESS, (step, self.steps, "edge")
            if dies:
                raise ActorDiedError()
        yield "result", self.result


def test_a_call_whose_replica_died_is_sent_again() -> None:
    method = FakeMethod(failures=1)
    assert asyncio.run(ask(method, "request")) == "image"
    assert method.calls == 2


def test_a_call_that_dies_twice_is_a_503_with_the_replacement_retry_after() -> None:
    method = FakeMethod(failures=2)
    with pytest.raises(ReplicaGone) as caught:
        asyncio.run(ask(method, "request"))
    assert caught.value.retry_after_s == REPLACEMENT_RETRY_AFTER_S and method.calls == 2


def test_a_stream_whose_replica_died_restarts_and_reports_progress_again() -> None:
    method = FakeMethod(failures=1)
    progress: list[tuple[int, int, str]] = []
    result = asyncio.run(ask_stream(method, "request", on_progress=lambda *p: progress.append(p)))
    assert result == "image" and method.calls == 2
    assert progress == [(1, 2, "edge"), (1, 2, "edge"), (2, 2, "edge")]


def test_a_stream_that_dies_twice_is_a_503() -> None:
    method = FakeMethod(failures=2)
    with pytest.raises(TierOverloaded):
        asyncio.run(ask_stream(method, "request", on_progress=lambda *p: None))
    assert method.calls == 2
