"""The ingress's view of the tiers' load: a background poll that keeps admission control's view fresh,
and the cloud load the router reads, both from the replicas' reports merged by the shared state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from diffusionx.policy.admission import AdmissionControl
from diffusionx.policy.load import TierLoad
from diffusionx.policy.router import CloudLoad
from diffusionx.policy.service_model import ReplicaLoad

logger = logging.getLogger(__name__)

REFRESH_S = 0.25  # how often admission control's view of the tiers is read


def cloud_load(tier: TierLoad) -> CloudLoad:
    """The router's view of the cloud tier: each replica's own load."""
    return CloudLoad(tuple(ReplicaLoad.from_snapshot(snapshot) for snapshot in tier.per_replica))


class LoadView:
    """Feeds `admission.update` with `read()` every `refresh_s`, from the first `ensure_polling` on (it
    needs the replica's event loop), and then calls `publish()` (what this ingress reports back). A failed
    read (the shared state restarting) is skipped: the view ages out meanwhile and admission control stops
    trusting it."""

    def __init__(
        self,
        admission: AdmissionControl,
        read: Callable[[], Awaitable[Mapping[str, TierLoad]]],
        refresh_s: float = REFRESH_S,
        publish: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.admission = admission
        self._read = read
        self._publish = publish
        self.refresh_s = refresh_s
        self._poller: asyncio.Task[None] | None = None

    def ensure_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def refresh(self) -> None:
        try:
            self.admission.update(await self._read())
            if self._publish is not None:
                await self._publish()
        except Exception as error:
            logger.debug("tier load unavailable: %s", error)
