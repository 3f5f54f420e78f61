"""The speculation tier of the serving application (`diffusionx.workflows.modes.SpeculationTier`) over
DeploymentHandles: the cloud tier runs speculations (background work of the replica the request router
picks, the idlest), the shared state keeps the registry (key -> that replica), so a finalize on any ingress
replica finds a speculation and its claim is pinned to the replica where it lives.

Submitting runs after the preview was answered (off its path): the predictor's strength, the cloud load
from the shared state, the cloud replica, then the registry, which names what the new speculation
supersedes (the session's older one) or what expired; those are dropped on their replicas. A finalize
locates its speculation in the registry (one state call; none found is a miss), then claims it from the
replica; how the claim settled (hit, promoted, or miss when it was dropped or lost) is told to the
registry without holding up the response. An ingress remembers where the speculations it submitted run
(`recent` of them), so a finalize that comes back to it claims from the replica without the state call:
a hit is then one call. It also fetches what they produced: it peeks at the replica, first
`FETCH_FIRST_S` after submitting and then at doubling intervals (at most `FETCH_MAX_S` apart) until the
speculation finished, left, or its TTL passed (no peek while foreground requests wait in the tier's
queues, `policy.speculation.foreground_waiting`: a peek would take their place), and keeps the finished
results (`finished_bytes` of images, least recently fetched dropped first). A finalize that comes back
to it is then answered at once, with no call at all, and the claim that tells the replica and the
registry it was used runs after the answer.
A submit or a peek starts only while admission control finds room for a background call
(`AdmissionControl.background_room`), and neither is sent again when its replica died: in Serve's queue
it would take a place a user's request needs.
Peeks, not one call held open until the speculation finishes: an open call would count as a request in
flight on the cloud replica, and speculation never counts as load. The replica stays the judge of
whether it has a speculation: one the registry superseded or expired has been dropped there, and its
claim is a miss."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

from cachetools import LRUCache

from deployments.handles import ask
from diffusionx.engine.speculation import Claimed
from diffusionx.policy.load import TierLoad
from diffusionx.policy.speculation import IfRunning, Pinned, SpeculationPolicy, foreground_waiting
from diffusionx.requests import Img2ImgRequest

logger = logging.getLogger(__name__)

FETCH_FIRST_S = 0.05  # the first peek after submitting: a short refinement on an idle replica is done
FETCH_MAX_S = 1.0  # the longest wait between peeks


def _image_bytes(result: Any) -> int:
    image = getattr(result, "image", None)
    return 1 if image is None else image.width * image.height * len(image.getbands())


class HandleSpeculation:
    def __init__(
        self,
        cloud: Any,
        state: Any,
        policy: SpeculationPolicy,
        recent: int = 10_000,
        finished_bytes: int = 64 * 1024 * 1024,
        hold: Callable[[str], AbstractContextManager[object]] = lambda tier: nullcontext(),
        room: Callable[[str], bool] = lambda tier: True,
    ) -> None:
        self.cloud = cloud  # the CloudRefiner handle
        # counts each call to the cloud replicas while it runs (`AdmissionControl.holding`): it takes one of
        # the request slots Serve bounds there, which admission control shares out
        self.hold = hold
        # whether a call that may wait for a free replica starts now (`AdmissionControl.background_room`):
        # a submit or a peek waiting in Serve's queue would take a place a user's request needs
        self.room = room
        self.state = state  # the SharedState handle
        self.policy = policy
        self._submitted: LRUCache[str, Pinned] = LRUCache(maxsize=recent)  # key -> where it runs
        # key -> the finished result, fetched from its replica (module docstring)
        self._finished: LRUCache[str, Any] = LRUCache(maxsize=finished_bytes, getsizeof=_image_bytes)
        self._ask = ask  # retries a dead replica; a full queue is TierOverloaded
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget calls in flight

    async def replicas(self) -> list[dict]:
        tier: TierLoad = await self._ask(self.state.tier, "cloud")
        return [snapshot.to_dict() for snapshot in tier.per_replica]

    async def submit(self, key: str, session: str, request: Img2ImgRequest, steps: int) -> None:
        if not self.room("cloud"):
            return
        replica_id = await self._on_cloud("speculate", request, key, retries=0)
        if replica_id is None:
            return
        gone = await self._ask(self.state.register_speculation, key, replica_id, session, request.strength)
        pinned = self._submitted[key] = Pinned(key, replica_id, request.strength)
        self._finished.pop(key, None)  # a key submitted again: what it produced before is not kept twice
        for old in gone:
            self._submitted.pop(old.key, None)
            self._finished.pop(old.key, None)
        self.later(self._fetch(pinned))
        await asyncio.gather(*(self._on_cloud("drop_speculation", old) for old in gone))

    async def _fetch(self, pinned: Pinned) -> None:
        """Peeks at the speculation until it finished (its result is kept), left, or its TTL passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.ttl_s
        delay = FETCH_FIRST_S
        while loop.time() + delay < deadline:
            await asyncio.sleep(delay)
            if self._submitted.get(pinned.key) is not pinned:
                return  # claimed, superseded or forgotten meanwhile
            # no room for a call now, or foreground requests queued (it is not running then): peek later
            if not self.room("cloud") or foreground_waiting(await self.replicas()):
                delay = min(2 * delay, FETCH_MAX_S)
                continue
            peeked: Claimed = await self._on_cloud("peek_speculation", pinned, retries=0)
            if peeked.outcome == "hit":
                if self._submitted.get(pinned.key) is pinned:
                    self._finished[pinned.key] = peeked.result
                return
            if peeked.outcome != "running":
                return
            delay = min(2 * delay, FETCH_MAX_S)

    async def claim(self, key: str, strength: float | None, if_running: IfRunning) -> Claimed:
        pinned: Pinned | None = self._submitted.get(key)
        if pinned is not None and key in self._finished and strength in (None, pinned.strength):
            result = self._finished.pop(key)
            del self._submitted[key]
            self.later(self._settle_used(pinned))
            return Claimed("hit", result, pinned.strength)
        if pinned is None:
            pinned = await self._ask(self.state.locate_speculation, key)
        if pinned is None:
            return Claimed("miss")
        if strength is not None and strength != pinned.strength:
            self.later(self.state.count_speculation.remote("miss"))  # another strength: it stays for others
            return Claimed("miss")
        claimed: Claimed = await self._on_cloud("claim_speculation", pinned, if_running)
        if claimed.outcome != "running":
            self._submitted.pop(key, None)
            self.later(self.state.settle_speculation.remote(key, claimed.outcome))
        return replace(claimed, strength=pinned.strength)

    async def _settle_used(self, pinned: Pinned) -> None:
        """After a finalize was answered from a fetched result: the replica counts the speculation used and
        lets it go, the registry counts the hit."""
        claimed: Claimed = await self._on_cloud("claim_speculation", pinned, "drop")
        if claimed.outcome != "hit":  # dropped there meanwhile (its TTL): the answer stands, the count too
            logger.debug("speculation %s answered, then its replica said %s", pinned.key, claimed.outcome)
        await self._ask(self.state.settle_speculation, pinned.key, "hit")

    async def _on_cloud(self, method: str, *args: Any, retries: int = 1) -> Any:
        """A call to the cloud replicas' `method`, counted as a request there while it runs. Background
        calls (submit, peek) pass `retries=0`: one whose replica died is not sent again to wait for the
        replacement (the speculation died with it)."""
        with self.hold("cloud"):
            return await self._ask(getattr(self.cloud, method), *args, retries=retries)

    def later(self, call: Any) -> None:
        """Runs an awaitable without waiting for it (its failure is logged, not raised)."""

        async def run() -> None:
            try:
                await call
            except Exception as error:
                logger.warning("speculation bookkeeping failed: %r", error)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
