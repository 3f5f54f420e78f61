"""The ingress's write-behind preview store: a preview's id is answered at once, while its PNG travels to
the shared cache (`engine.preview_cache`, behind the SharedState deployment) in the background.

Until the put lands, this ingress answers the id from its own map of puts in flight; another ingress
replica asked within those milliseconds answers 404 as after an eviction, and the client resends the
image. The map holds only puts in flight, so it never grows with the cache.

The ingress also keeps the previews it made most recently (`recent_bytes` of PNG, least recently used
dropped first), so the next round or the finalize of a session this ingress served needs no call to the
shared state: a finalize answered by a finished speculation costs a few milliseconds, and that call would
be a good part of them. The shared cache stays the source for every other ingress replica.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from cachetools import LRUCache

from diffusionx.serving.errors import PreviewNotFound

logger = logging.getLogger(__name__)

PutPreview = Callable[[bytes, str, str], Coroutine[Any, Any, object]]  # (png, preview_id, owner)
GetPreview = Callable[[str, str], Coroutine[Any, Any, bytes | None]]  # (preview_id, owner) -> png or None


class PreviewStore:
    def __init__(self, put: PutPreview, get: GetPreview, recent_bytes: int = 32 * 2**20) -> None:
        self._put = put
        self._get = get
        self._storing: dict[str, tuple[str, bytes, asyncio.Task[object]]] = {}  # id -> (owner, png, put)
        self._recent: LRUCache[str, tuple[str, bytes]] = LRUCache(
            maxsize=max(1, recent_bytes), getsizeof=lambda entry: len(entry[1])
        )  # id -> (owner, png): this ingress's latest previews

    def store(self, png: bytes, owner: str) -> str:
        """A new preview id for `png`, answered at once; the put to the shared cache runs behind it."""
        preview_id = uuid.uuid4().hex
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(self._put(png, preview_id, owner))
        self._storing[preview_id] = (owner, png, task)
        if len(png) <= self._recent.maxsize:
            self._recent[preview_id] = (owner, png)
        task.add_done_callback(lambda done: self._stored(preview_id, done))
        return preview_id

    def _stored(self, preview_id: str, task: asyncio.Task[object]) -> None:
        self._storing.pop(preview_id, None)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("preview %s was not cached: %r", preview_id, task.exception())

    @property
    def in_flight(self) -> int:
        return len(self._storing)

    async def load(self, preview_id: str, owner: str) -> bytes:
        """The PNG of `owner`'s preview `preview_id`; PreviewNotFound when unknown, expired or another's."""
        storing = self._storing.get(preview_id)
        if storing is not None and storing[0] == owner:
            return storing[1]
        recent = self._recent.get(preview_id)
        if recent is not None and recent[0] == owner:
            return recent[1]
        png = await self._get(preview_id, owner)
        if png is None:
            raise PreviewNotFound(
                f"preview_id '{preview_id}' is unknown or has expired (the server keeps a bounded cache); "
                "send the image itself instead"
            )
        return png
