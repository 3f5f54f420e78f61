"""The ingress side of speculation over fake DeploymentHandles: a finished speculation is fetched by peeks and
answers its finalize with no call to the cloud tier on the answer's path; the claim follows the answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from PIL import Image

from deployments.speculation import HandleSpeculation
from diffusionx.engine.speculation import Claimed
from diffusionx.policy.speculation import Pinned, SpeculationPolicy
from diffusionx.requests import Img2ImgRequest


class Method:
    """A handle method: `.remote(*args)` awaits `answer(*args)`; every call is recorded."""

    def __init__(self, name: str, calls: list, answer: Any) -> None:
        self.name, self.calls, self.answer = name, calls, answer

    def remote(self, *args: Any) -> Any:
        self.calls.append((self.name, args))

        async def call() -> Any:
            return self.answer(*args)

        return call()


class FakeCloud:
    """A cloud replica holding one speculation that finishes after `running_peeks` peeks."""

    def __init__(self, calls: list, running_peeks: int) -> None:
        self.result = SimpleNamespace(image=Image.new("RGB", (8, 8)), unet_calls=None)
        self.left = running_peeks
        self.speculate = Method("speculate", calls, lambda request, key: "replica-1")
        self.peek_speculation = Method("peek", calls, self._peek)
        self.claim_speculation = Method(
            "claim", calls, lambda pinned, if_running: Claimed("hit", self.result)
        )
        self.drop_speculation = Method("drop", calls, lambda pinned: 0)

    def _peek(self, pinned: Pinned) -> Claimed:
        self.left -= 1
        return Claimed("running") if self.left >= 0 else Claimed("hit", self.result)


def fake_state(calls: list) -> SimpleNamespace:
    return SimpleNamespace(
        register_speculation=Method("register", calls, lambda *args: []),
        locate_speculation=Method("locate", calls, lambda key: None),
        settle_speculation=Method("settle", calls, lambda key, result: None),
        count_speculation=Method("count", calls, lambda result: None),
        tier=Method("tier", calls, lambda tier: SimpleNamespace(per_replica=[])),  # nothing queued
    )


def request(strength: float = 0.3) -> Img2ImgRequest:
    return Img2ImgRequest("a cat", Image.new("RGB", (8, 8)), strength, seed=1, num_inference_steps=20)


async def submitted(running_peeks: int, fetched: bool) -> tuple[list, FakeCloud, HandleSpeculation]:
    """(the calls, the cloud, the ingress side) once speculation "k" at strength 0.3 was submitted, and
    with `fetched` once the ingress holds its result."""
    calls: list = []
    cloud = FakeCloud(calls, running_peeks)
    speculation = HandleSpeculation(cloud, fake_state(calls), SpeculationPolicy())
    await speculation.submit("k", "session", request(), 6)
    while fetched and not speculation._finished:
        await asyncio.sleep(0.01)
    return calls, cloud, speculation


def test_a_fetched_speculation_answers_without_a_call_and_is_claimed_after():
    async def scenario():
        # peeks at 0.05, 0.1, 0.2 s: running, running, finished
        calls, cloud, speculation = await submitted(running_peeks=2, fetched=True)
        assert [name for name, _ in calls].count("peek") == 3
        before = len(calls)
        claimed = await speculation.claim("k", None, "keep")
        assert claimed.outcome == "hit" and claimed.result is cloud.result and claimed.strength == 0.3
        assert len(calls) == before  # answered with no call
        await asyncio.gather(*speculation._tasks)
        after = [(name, args[-1]) for name, args in calls[before:]]
        # the replica lets it go, the registry counts it
        assert after == [("claim", "drop"), ("settle", "hit")]
        assert (await speculation.claim("k", None, "keep")).outcome == "miss"  # answered once from here

    asyncio.run(scenario())


def test_a_finalize_before_the_fetch_claims_from_the_replica_and_stops_the_peeks():
    async def scenario():
        calls, _cloud, speculation = await submitted(running_peeks=100, fetched=False)
        claimed = await speculation.claim("k", None, "keep")
        assert claimed.outcome == "hit" and ("claim", (Pinned("k", "replica-1", 0.3), "keep")) in calls
        await asyncio.sleep(0.2)
        assert [name for name, _ in calls].count("peek") <= 1  # the peeks end once the key was claimed

    asyncio.run(scenario())


def test_another_strength_is_not_answered_from_the_fetched_result():
    async def scenario():
        _calls, _cloud, speculation = await submitted(running_peeks=0, fetched=True)  # at strength 0.3
        assert (await speculation.claim("k", 0.5, "keep")).outcome == "miss"
        assert "k" in speculation._finished  # it stays for a finalize at its strength

    asyncio.run(scenario())


def test_no_peek_while_foreground_requests_wait_in_the_tier_queue():
    async def run() -> list:
        calls: list = []
        cloud = FakeCloud(calls, running_peeks=0)
        queued = {"n": 3}  # foreground requests waiting on the replica, until the test empties the queue
        snapshot = SimpleNamespace(to_dict=lambda: {"queued": queued["n"], "pool": [], "max_batch_size": 4})
        state = fake_state(calls)
        state.tier = Method("tier", calls, lambda tier: SimpleNamespace(per_replica=[snapshot]))
        speculation = HandleSpeculation(cloud, state, SpeculationPolicy())
        await speculation.submit("k", "session", request(), 6)
        await asyncio.sleep(0.5)  # past several peek times: the tier was asked, the replica was not
        assert [name for name, _ in calls].count("tier") >= 2
        assert "peek" not in [name for name, _ in calls]
        queued["n"] = 0
        while not speculation._finished:
            await asyncio.sleep(0.01)
        return calls

    calls = asyncio.run(run())
    assert [name for name, _ in calls].count("peek") == 1  # once the queue emptied, one peek found it done


def test_every_call_to_the_cloud_replicas_holds_a_request_slot_in_admission_control():
    """Submit, peek and claim each take one of the request slots Serve bounds on the cloud replicas while
    they run, so admission control counts them (a burst would otherwise bounce off Serve's queue)."""
    from diffusionx.policy.admission import AdmissionControl

    admission = AdmissionControl({"cloud": 4})
    seen: list[tuple[str, int]] = []

    async def scenario() -> None:
        calls: list = []
        cloud = FakeCloud(calls, running_peeks=1)
        for name in ("speculate", "peek_speculation", "claim_speculation"):
            method = getattr(cloud, name)
            answer = method.answer
            method.answer = lambda *args, _name=name, _answer=answer: (
                seen.append((_name, admission.background_requests.get("cloud", 0))) or _answer(*args)
            )
        speculation = HandleSpeculation(cloud, fake_state(calls), SpeculationPolicy(), hold=admission.holding)
        await speculation.submit("k", "session", request(), 6)
        while not speculation._finished:
            await asyncio.sleep(0.01)
        await speculation.claim("k", None, "keep")
        await asyncio.gather(*speculation._tasks)

    asyncio.run(scenario())
    assert {name for name, _ in seen} == {"speculate", "peek_speculation", "claim_speculation"}
    assert all(held == 1 for _, held in seen), seen
    assert admission.background_requests["cloud"] == 0  # released after each call


def test_no_submit_and_no_peek_while_admission_control_finds_no_room_for_a_background_call():
    """A submit or a peek waiting in Serve's queue would take a place a user's request needs: without room
    (`AdmissionControl.background_room`) nothing is submitted, and a submitted speculation is not peeked
    at until there is room again."""
    room = {"cloud": False}

    async def scenario() -> list:
        calls: list = []
        cloud = FakeCloud(calls, running_peeks=0)
        speculation = HandleSpeculation(
            cloud, fake_state(calls), SpeculationPolicy(), room=lambda tier: room[tier]
        )
        await speculation.submit("k", "session", request(), 6)
        assert calls == []  # nothing sent, not even to the state
        room["cloud"] = True
        await speculation.submit("k", "session", request(), 6)
        room["cloud"] = False
        await asyncio.sleep(0.3)  # past the first peeks' times
        assert "peek" not in [name for name, _ in calls]
        room["cloud"] = True
        while not speculation._finished:
            await asyncio.sleep(0.01)
        return calls

    calls = asyncio.run(scenario())
    assert [name for name, _ in calls].count("speculate") == 1
    assert [name for name, _ in calls].count("peek") == 1
