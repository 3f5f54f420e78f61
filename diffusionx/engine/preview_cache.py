"""A bounded cache of preview images by id (LRU). The server keeps no state it cannot lose: when an id has
been evicted the client resends the image itself."""

from __future__ import annotations

import uuid
from collections import OrderedDict


class PreviewCache:
    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self.capacity = capacity
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def put(self, png: bytes, preview_id: str | None = None) -> str:
        """Stores `png` under `preview_id` (the caller's, e.g. made before the put; default: a new one)."""
        preview_id = preview_id or uuid.uuid4().hex
        self._items[preview_id] = png
        self._items.move_to_end(preview_id)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.evictions += 1
        return preview_id

    def get(self, preview_id: str) -> bytes | None:
        png = self._items.get(preview_id)
        if png is None:
            self.misses += 1
            return None
        self._items.move_to_end(preview_id)
        self.hits += 1
        return png

    def stats(self) -> dict[str, int]:
        return {
            "size": len(self._items),
            "capacity": self.capacity,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
