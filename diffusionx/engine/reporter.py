"""Coalescing reporter: sends a replica's latest load snapshot without piling up sends.

Every change of a tier's load asks for a report; sending one per change would start one task per request
and, when the receiver is slow, let them grow without bound. Here at most one send is in flight; asks that
arrive meanwhile mark the state dirty, and one more send follows with the then-latest snapshot. Sending is
best effort: an error is swallowed (stats must never fail a request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class CoalescingReporter:
    def __init__(self, send: Callable[[], Awaitable[None]]) -> None:
        self._send = send  # reads the latest snapshot when called
        self._task: asyncio.Task | None = None
        self._dirty = False
        self.sends = 0

    def request(self) -> None:
        """Asks for a report of the current state (call from the event loop; never blocks)."""
        if self._task is not None and not self._task.done():
            self._dirty = True
            return
        self._dirty = False
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while True:
            self.sends += 1
            with contextlib.suppress(Exception):
                await self._send()
            if not self._dirty:
                return
            self._dirty = False

    @property
    def in_flight(self) -> bool:
        return self._task is not None and not self._task.done()
