"""The preview cache: preview PNGs by id, bounded by bytes and by age (`cachetools.TTLCache` with a
byte-counting `getsizeof`: it evicts least recently used entries to stay under `max_bytes`, and entries
older than `ttl_s` expire). The server keeps no state it cannot lose: when an id has been evicted or has
expired the client resends the image itself.

Each preview belongs to an owner (the API key that created it; "" when keys are off): another owner's id
reads as unknown, so ids cannot be used across keys.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from cachetools import TTLCache

ENTRY_OVERHEAD_BYTES = 256  # id, owner, tuple and the cache's own links, per entry (measured order)


def _entry_bytes(entry: tuple[str, bytes]) -> int:
    owner, png = entry
    return len(png) + len(owner) + ENTRY_OVERHEAD_BYTES


class _CountingTTLCache(TTLCache):
    """TTLCache that counts entries evicted to make room (expiry is counted apart)."""

    evictions = 0

    def popitem(self):  # called by cachetools only to evict for size
        self.evictions += 1
        return super().popitem()


class PreviewCache:
    def __init__(
        self,
        max_bytes: int = 256 * 1024 * 1024,
        ttl_s: float = 3600.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s={ttl_s} must be > 0")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._items = _CountingTTLCache(maxsize=max_bytes, ttl=ttl_s, timer=timer, getsizeof=_entry_bytes)
        self.hits = 0
        self.misses = 0
        self.too_large = 0

    def put(self, png: bytes, preview_id: str | None = None, owner: str = "") -> str:
        """Stores `png` for `owner` under `preview_id` (the caller's, e.g. made before the put; default: a
        new one) and returns the id. A PNG larger than the whole cache is not kept: its id answers 404 and
        the client resends the image."""
        preview_id = preview_id or uuid.uuid4().hex
        if _entry_bytes((owner, png)) > self.max_bytes:
            self.too_large += 1
        else:
            self._items[preview_id] = (owner, png)
        return preview_id

    def get(self, preview_id: str, owner: str = "") -> bytes | None:
        entry = self._items.get(preview_id)
        if entry is None or entry[0] != owner:
            self.misses += 1
            return None
        self.hits += 1
        return entry[1]

    def stats(self) -> dict[str, int]:
        self._items.expire()
        return {
            "size": len(self._items),
            "bytes": int(self._items.currsize),
            "max_bytes": self.max_bytes,
            "ttl_s": int(self.ttl_s),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self._items.evictions,
            "too_large": self.too_large,
        }
