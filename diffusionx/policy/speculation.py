"""Speculative refinement: when the cloud tier may refine a preview nobody has asked to finalize yet.

A finalize refines the last preview at the strength the predictor gives it, and the user looks at that
preview for seconds before asking. So the workflow submits the refinement as soon as the preview is
answered, as background work (`StepBatcher`'s background class), and a finalize of the same (preview,
prompt, seed, steps) at the speculation's strength is answered from it. The decisions here are pure
functions and a small registry, tested without Ray:

- `affordable_background`: how many background samples a step may add to `f` foreground samples. None
  while foreground samples wait for a slot (the batcher enforces that); otherwise the empty slots whose
  cost the service model's step time `t(b)` says a foreground step can afford: `t(f + k) <= (1 +
  max_slowdown) * t(f)`; on an idle replica `t(k) <= (1 + max_slowdown) * t(1)` (at least one), since a
  foreground arrival waits for that step. A GPU's step time is nearly flat below its batch capacity, so
  speculation shares steps and fills idle ones there; a CPU's grows with `b`, so with a small slowdown it
  runs one sample at a time, only when the tier is idle.
- `SpeculationPolicy.allows`: submit only when the tier's idle capacity (`idle_share`: the lower of free
  batch slots over all slots now, from the replicas' reported foreground pools and queues, and the share
  of recent time the replicas held no foreground work) is at least `idle_floor` and the speculative steps
  already queued on the tier are within `max_steps`. The workflow asks before it predicts the strength
  (`allows` without steps), so a busy tier costs no prediction either. A replica's background gate
  (`host_idle`: a CPU replica runs speculative steps only while the host has a core to spare) is not
  asked: a preview is answered just after the edge computed it, so the host looks busy at exactly the
  moment a speculation is submitted; submitted anyway, it waits in the replica's pool and runs in the
  host's next idle moments (the think time), which is what it is for.
- `SpeculationPolicy.worth`: speculate on a preview only when sessions at its round finalize there often
  enough (`finalize_chance`, measured by the ingress's `SessionTracker`: of the recent sessions that left
  that round, the share that finalized rather than previewed again or went idle) of at least
  `min_finalize_chance`; unknown (too few sessions measured) counts as worth it. A speculation on a preview
  the session then edits is superseded: all of its work is wasted, and on a machine whose cores the tiers
  share it slows the next previews of every session. At a chance of `p`, a speculation that is used costs
  `(1 - p) / p` wasted ones on average: 4 at the default floor of 0.2. Sessions that always run a fixed
  number of rounds then speculate only on their last one; sessions whose length varies keep speculating
  on every round whose chance is above the floor.
- `speculation_key`: what a finalize must match to use a speculation. The strength is not part of it: the
  registry keeps the strength the speculation runs at, so a finalize finds a finished speculation before
  it predicts anything (the prediction was made when the speculation was submitted, from the same preview
  and prompt; a finalize that names another strength does not use it).
- `SpeculationRegistry`: key -> the replica it runs on and its strength, per session (a newer preview of a
  session supersedes its older speculation) and with a TTL, and the counts by result. The serving
  application keeps one in its shared state actor so any ingress replica finds a speculation; the cloud
  replica that runs it keeps the job (`diffusionx.engine.speculation.SpeculationStore`).

A finalize locates its speculation in the registry, then claims it from the replica: a finished one is a
`hit` at once; a running one is kept while the finalize predicts and routes (`running`), then promoted
when the route is that same refinement, or dropped (`miss`). The registry forgets a speculation when its
claim settles (hit, promoted or miss).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

SpeculationMode = Literal["off", "idle"]
SPECULATION_MODES: tuple[str, ...] = ("off", "idle")
RESULTS: tuple[str, ...] = ("hit", "promoted", "miss", "superseded", "expired")
# what a claim does with a speculation still running: keep it (the finalize has not routed yet), promote it
# to the foreground and wait for it, or drop it
IfRunning = Literal["keep", "promote", "drop"]
DEFAULT_MAX_SLOWDOWN = 0.05  # a foreground step may be this much slower for sharing it with background


def affordable_background(
    foreground: int,
    max_batch_size: int,
    step_s: Callable[[int], float | None],
    max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
) -> int:
    """Background samples a step may add to `foreground` samples (module docstring). With foreground, the
    most that keep the step within `max_slowdown` of `t(foreground)` (none without a measured step time).
    Without foreground, at least one, and as many as keep the step within `max_slowdown` of `t(1)`: a
    foreground arrival waits for the step in flight, so that step stays about as short as one sample's."""
    reference = max(1, foreground)
    base = step_s(reference)
    if base is None:
        return 0 if foreground > 0 else 1
    allowed = 0 if foreground > 0 else 1
    while foreground + allowed < max_batch_size:
        slower = step_s(foreground + allowed + 1)
        if slower is None or slower > (1.0 + max_slowdown) * base:
            break
        allowed += 1
    return allowed


@dataclass(frozen=True)
class SpeculationPolicy:
    """When the workflow submits a speculative refinement (module docstring)."""

    mode: SpeculationMode = "idle"
    idle_floor: float = 0.5  # least share of the tier's batch slots free of foreground work
    max_steps: int = 400  # most speculative denoising steps queued on the tier
    ttl_s: float = 120.0  # a speculation not claimed within this is dropped
    min_finalize_chance: float = 0.2  # least measured chance that the session finalizes this preview

    def __post_init__(self) -> None:
        if self.mode not in SPECULATION_MODES:
            raise ValueError(f"speculation={self.mode!r} is not allowed: use one of {SPECULATION_MODES}")
        if not 0.0 <= self.idle_floor <= 1.0:
            raise ValueError(f"speculation_idle_floor={self.idle_floor} is not allowed: use 0..1")
        if self.max_steps < 1:
            raise ValueError(f"speculation_max_steps={self.max_steps} is not allowed: use >= 1")
        if self.ttl_s <= 0:
            raise ValueError(f"speculation_ttl_s={self.ttl_s} is not allowed: use > 0")
        if not 0.0 <= self.min_finalize_chance <= 1.0:
            raise ValueError(
                f"speculation_min_finalize_chance={self.min_finalize_chance} is not allowed: use 0..1"
            )

    def worth(self, finalize_chance: float | None) -> bool:
        """Whether a preview whose session finalizes at its round with `finalize_chance` (None: not
        measured yet) is worth a speculation (module docstring)."""
        if self.mode == "off":
            return False
        return finalize_chance is None or finalize_chance >= self.min_finalize_chance

    def allows(self, replicas: Sequence[dict], steps: int = 0) -> bool:
        """Whether a speculation of `steps` steps may join the tier whose replicas reported `replicas`
        (`TierMonitor` snapshot dicts: `pool`, `queued`, `max_batch_size`, `background_steps`)."""
        if self.mode == "off" or not replicas:
            return False
        queued = background_steps(replicas) + steps
        return idle_share(replicas) >= self.idle_floor and queued <= self.max_steps


def idle_share(replicas: Sequence[dict]) -> float:
    """The tier's idle capacity, the lower of two shares: free batch slots over all batch slots now
    (foreground samples in each replica's pool and queue take slots, background samples do not), and the
    recent idle time (1 - each replica's `busy_share`, `diffusionx.policy.busy`, over the tier). The first
    alone lets a tier under load speculate in the moments between its requests."""
    slots = sum(max(1, int(r.get("max_batch_size", 1))) for r in replicas)
    busy = sum(
        min(max(1, int(r.get("max_batch_size", 1))), len(r.get("pool") or ()) + int(r.get("queued", 0)))
        for r in replicas
    )
    if not slots:
        return 0.0
    recent_idle = 1.0 - sum(float(r.get("busy_share", 0.0)) for r in replicas) / len(replicas)
    return min((slots - busy) / slots, recent_idle)


def foreground_waiting(replicas: Sequence[dict]) -> bool:
    """Whether foreground requests wait in a replica's queue. No speculation runs then (it takes only batch
    slots foreground work leaves empty), and a call about one (a peek) would take a place in the queue
    those requests wait for, which admission control sizes for foreground work alone."""
    return any(int(r.get("queued", 0)) > 0 for r in replicas)


def background_steps(replicas: Sequence[dict]) -> int:
    return sum(int(r.get("background_steps", 0)) for r in replicas)


def preview_digest(png: bytes) -> str:
    """The identity of a preview: its PNG bytes (the same whether it is named by id or sent back)."""
    return hashlib.sha256(png).hexdigest()


def speculation_key(
    digest: str,
    prompt: str,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float | None,
) -> str:
    """What a finalize must match to use a speculation: same preview, prompt, seed, steps and guidance, at
    the strength the registry keeps with it, give the same pixels."""
    guidance = "default" if guidance_scale is None else repr(float(guidance_scale))
    text = "\x1f".join((digest, prompt, str(seed), str(num_inference_steps), guidance))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Registered:
    """Where a speculation runs, and at which strength."""

    key: str
    replica_id: str
    session: str
    created_at: float
    strength: float


@dataclass
class SpeculationRegistry:
    """Speculations by key, at most one per session, dropped after `ttl_s`; counts by result.

    `clock` is injected (seconds). The registry only says where a speculation lives; the replica that runs
    it decides hit or promoted when it is claimed (`count`)."""

    ttl_s: float = 120.0
    entries: dict[str, Registered] = field(default_factory=dict)
    by_session: dict[str, str] = field(default_factory=dict)  # session -> key
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))

    def register(
        self, key: str, replica_id: str, session: str, now: float, strength: float
    ) -> list[Registered]:
        """Records a speculation; returns those it supersedes (the session's older one; a re-registered
        key is replaced) and those expired by now: the caller drops them on their replicas."""
        gone = self.expire(now)
        for older in {self.by_session.get(session), key} - {None}:
            entry = self.entries.get(older)  # type: ignore[arg-type]
            if entry is None:
                continue
            self._forget(entry)
            if entry.key == key and entry.replica_id == replica_id:
                continue  # the same speculation again, on the same replica: nothing to drop
            gone.append(entry)
            self.counts["superseded"] += 1
        self.entries[key] = Registered(key, replica_id, session, now, strength)
        self.by_session[session] = key
        return gone

    def locate(self, key: str, now: float) -> Registered | None:
        """The speculation of `key` for a finalize to claim; None and a miss counted when there is none.
        It stays registered until the claim settles (`settle`)."""
        entry = self.entries.get(key)
        if entry is not None and now - entry.created_at > self.ttl_s:
            self.expire(now)
            entry = None
        if entry is None:
            self.counts["miss"] += 1
        return entry

    def settle(self, key: str, result: str) -> None:
        """A claim of `key` ended in `result` (hit, promoted, or miss: dropped or lost on its replica): the
        speculation leaves the registry and the result is counted."""
        self.count(result)
        entry = self.entries.get(key)
        if entry is not None:
            self._forget(entry)

    def expire(self, now: float) -> list[Registered]:
        """Drops speculations older than the TTL, counted as expired; returns them."""
        old = [entry for entry in self.entries.values() if now - entry.created_at > self.ttl_s]
        for entry in old:
            self._forget(entry)
            self.counts["expired"] += 1
        return old

    def count(self, result: str) -> None:
        if result not in RESULTS:
            raise ValueError(f"result={result!r} is not one of {RESULTS}")
        self.counts[result] += 1

    def _forget(self, entry: Registered) -> None:
        self.entries.pop(entry.key, None)
        if self.by_session.get(entry.session) == entry.key:
            del self.by_session[entry.session]


@dataclass(frozen=True)
class Pinned:
    """A call about one speculation, for the replica that runs it: the cloud tier's request router sends
    it to `replica_id` (any other replica answers that it holds no such speculation). `strength`: what
    the speculation refines at (a finalize that names another strength does not use it)."""

    key: str
    replica_id: str
    strength: float = 0.0
