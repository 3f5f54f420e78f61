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
a hit is then one call. The replica stays the judge: a speculation the registry superseded or expired
has been dropped there, and its claim is a miss."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from cachetools import LRUCache

from deployments.handles import ask
from diffusionx.engine.speculation import Claimed
from diffusionx.policy.load import TierLoad
from diffusionx.policy.speculation import IfRunning, Pinned, SpeculationPolicy
from diffusionx.requests import Img2ImgRequest

logger = logging.getLogger(__name__)


class HandleSpeculation:
    def __init__(self, cloud: Any, state: Any, policy: SpeculationPolicy, recent: int = 10_000) -> None:
        self.cloud = cloud  # the CloudRefiner handle
        self.state = state  # the SharedState handle
        self.policy = policy
        self._submitted: LRUCache[str, Pinned] = LRUCache(maxsize=recent)  # key -> where it runs
        self._ask = ask  # retries a dead replica; a full queue is TierOverloaded
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget calls in flight

    async def replicas(self) -> list[dict]:
        tier: TierLoad = await self._ask(self.state.tier, "cloud")
        return [snapshot.to_dict() for snapshot in tier.per_replica]

    async def submit(self, key: str, session: str, request: Img2ImgRequest, steps: int) -> None:
        replica_id = await self._ask(self.cloud.speculate, request, key)
        if replica_id is None:
            return
        gone = await self._ask(self.state.register_speculation, key, replica_id, session, request.strength)
        self._submitted[key] = Pinned(key, replica_id, request.strength)
        for pinned in gone:
            self._submitted.pop(pinned.key, None)
        await asyncio.gather(*(self._ask(self.cloud.drop_speculation, pinned) for pinned in gone))

    async def claim(self, key: str, strength: float | None, if_running: IfRunning) -> Claimed:
        pinned: Pinned | None = self._submitted.get(key)
        if pinned is None:
            pinned = await self._ask(self.state.locate_speculation, key)
        if pinned is None:
            return Claimed("miss")
        if strength is not None and strength != pinned.strength:
            self.later(self.state.count_speculation.remote("miss"))  # another strength: it stays for others
            return Claimed("miss")
        claimed: Claimed = await self._ask(self.cloud.claim_speculation, pinned, if_running)
        if claimed.outcome != "running":
            self._submitted.pop(key, None)
            self.later(self.state.settle_speculation.remote(key, claimed.outcome))
        return replace(claimed, strength=pinned.strength)

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
