"""SharedState: the one place ingress replicas share. Holds the preview cache (so a preview id resolves on
any ingress replica), the registry of speculative refinements (key -> the cloud replica that runs it, so
a finalize on any ingress replica finds it; `diffusionx.policy.speculation.SpeculationRegistry`) and the
latest stats snapshot of every tier replica. Its memory is bounded: the cache
by bytes and age (`preview_cache_bytes`, `preview_cache_ttl_s`), the snapshots by the live replicas; the
actor reserves `memory` (a config setting) for both."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray import serve

from deployments.metrics import speculation_metrics
from diffusionx.engine.preview_cache import PreviewCache
from diffusionx.policy.load import TierLoad, TierSnapshot, merge_snapshots
from diffusionx.policy.sessions import SessionActivity, merge_activity
from diffusionx.policy.speculation import Pinned, SpeculationRegistry

STALE_AFTER_S = 30.0  # a replica that has not reported for this long is gone (replicas report every ~2 s)
TIERS = ("edge", "predictor", "cloud")


@serve.deployment(
    name="SharedState",
    num_replicas=1,  # the one place ingress replicas share: never more than one
    max_ongoing_requests=1000,
)
class SharedState:
    def __init__(
        self,
        preview_cache_bytes: int = 64 * 1024 * 1024,
        preview_cache_ttl_s: float = 3600.0,
        speculation_ttl_s: float = 120.0,
    ) -> None:
        self._cache = PreviewCache(preview_cache_bytes, preview_cache_ttl_s)
        self._snapshots: dict[str, dict[str, TierSnapshot]] = {tier: {} for tier in TIERS}
        self._speculations = SpeculationRegistry(speculation_ttl_s)
        self._sessions: dict[str, SessionActivity] = {}  # by ingress replica

    # -- speculative refinements --------------------------------------------------------------------------
    def _counting(self, operation: Callable[[], Any]) -> Any:
        before = dict(self._speculations.counts)
        outcome = operation()
        speculation_metrics().counted(before, self._speculations.counts)
        return outcome

    async def register_speculation(
        self, key: str, replica_id: str, session: str, strength: float
    ) -> list[Pinned]:
        """Records where a speculation runs and at which strength; returns those it supersedes or that
        expired, for the caller to drop on their replicas."""
        gone = self._counting(
            lambda: self._speculations.register(key, replica_id, session, time.time(), strength)
        )
        return [Pinned(entry.key, entry.replica_id, entry.strength) for entry in gone]

    async def locate_speculation(self, key: str) -> Pinned | None:
        """Where the speculation of `key` runs, and its strength; None: none (a miss, counted)."""
        entry = self._counting(lambda: self._speculations.locate(key, time.time()))
        return None if entry is None else Pinned(entry.key, entry.replica_id, entry.strength)

    async def settle_speculation(self, key: str, result: str) -> None:
        """How a claim of `key` ended (hit, promoted, or miss: dropped, another strength, or lost): it
        leaves the registry, and the result is counted."""
        self._counting(lambda: self._speculations.settle(key, result))

    async def count_speculation(self, result: str) -> None:
        """A result of a speculation that stays registered (a finalize at another strength: a miss)."""
        self._counting(lambda: self._speculations.count(result))

    def _speculation_stats(self) -> dict:
        self._counting(lambda: self._speculations.expire(time.time()))
        calls = {"used": 0, "wasted": 0}
        for snapshot in self._live("cloud"):
            for outcome, count in snapshot.speculative_unet_calls.items():
                calls[outcome] = calls.get(outcome, 0) + int(count)
        return {
            "results": dict(self._speculations.counts),
            "unet_calls": calls,
            "held": len(self._speculations.entries),
        }

    async def put_preview(self, png: bytes, preview_id: str | None = None, owner: str = "") -> str:
        return self._cache.put(png, preview_id, owner)

    async def get_preview(self, preview_id: str, owner: str = "") -> bytes | None:
        return self._cache.get(preview_id, owner)

    async def report(self, tier: str, replica_id: str, snapshot: TierSnapshot) -> None:
        self._snapshots.setdefault(tier, {})[replica_id] = snapshot

    def _live(self, tier: str) -> list[TierSnapshot]:
        now = time.time()
        replicas = self._snapshots.get(tier, {})
        for replica_id in [r for r, s in replicas.items() if now - s.taken_at > STALE_AFTER_S]:
            del replicas[replica_id]
        return list(replicas.values())

    async def tier(self, tier: str) -> TierLoad:
        return merge_snapshots(self._live(tier))

    async def tiers(self) -> dict[str, TierLoad]:
        """Every tier's merged view (what admission control reads)."""
        return {tier: merge_snapshots(self._live(tier)) for tier in TIERS}

    async def report_sessions(self, source: str, activity: dict) -> None:
        """An ingress replica's session activity (the cloud tier's leading indicator)."""
        self._sessions[source] = SessionActivity(**activity)

    async def sessions(self) -> dict:
        """Every live ingress replica's session activity, merged (`diffusionx.policy.sessions`)."""
        now = time.time()
        for source in [s for s, a in self._sessions.items() if now - a.taken_at > STALE_AFTER_S]:
            del self._sessions[source]
        return merge_activity(self._sessions.values()).to_dict()

    async def stats(self) -> dict:
        return {
            "tiers": {tier: load.to_dict() for tier, load in (await self.tiers()).items()},
            "preview_cache": self._cache.stats(),
            "speculation": self._speculation_stats(),
        }
