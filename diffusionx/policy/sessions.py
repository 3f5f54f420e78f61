"""Session activity seen at the ingress: the leading indicator of the cloud tier's work.

A session previews (a preview without a parent image), edits (previews of a previous preview id) and, for
some share of sessions, finalizes one of its previews on the cloud tier. So the sessions previewing now
announce the finalizes of the next `preview-to-finalize` seconds. `SessionTracker` follows sessions by
their preview ids (each new preview id joins its parent's session) and measures, over its recent history:

- `previewing`: sessions with a preview and no finalize yet, active within `idle_s`;
- `finalize_share`: of the sessions started at least `mature_s` ago, the share that finalized;
- `preview_to_finalize_s`: their mean time from the first preview to the finalize;
- `preview_to_finalize_sd_s`: the spread (standard deviation) of that time over the same sessions;
- `measured_sessions`: how many sessions those figures rest on;
- `previewing_by_age`: the sessions previewing counted by their age (time since their first preview) in
  `AGE_BIN_S` bins, the last bin holding every older one: which of them are due to finalize soon;
- `finalize_steps`: mean denoising steps a finalize ran on the cloud tier;
- `starts_per_s`: sessions started per second over the last `rate_window_s` (they finalize a lead later);
- `finalize_chance(preview_id)`: of the recent sessions that reached the round this preview's session is
  at, the share that finalized at that round rather than previewing again or going idle (speculation asks
  it: a speculative refinement of a preview the session will edit again is wasted work; `edit_likely`
  reads it the other way, for the edge's preparation of the next edit).

The share and the lead are measured on whole cohorts (sessions started `mature_s` ago or earlier, by then
finalized, abandoned or open for longer than any session the policy plans for), not on the sessions that
have ended so far: while a load rises, the sessions that have finalized are the short ones, and the
abandoned ones end only `idle_s` after their last preview, so figures over ended sessions read the lead
short and the share high (in the quick autoscaling bench, a lead of 32 s at 45 s into the ramp against
61 s over whole sessions), which sizes the tier for finalizes that come later than it plans.

Until a figure is measured it is reported as 0 (the policy then uses its prior, or forecasts nothing). The
tracker holds at most `max_sessions` sessions and `history` measured ones (oldest dropped first), so its
memory is bounded.
Ray-free, with an injected clock; the ingress feeds it and publishes `activity()` (deployments/state.py).
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

AGE_BIN_S = 5.0  # seconds per bin of `previewing_by_age`
AGE_BINS = 48  # bins: sessions previewing for 240 s or more share the last one


@dataclass(frozen=True)
class SessionActivity:
    """What the cloud tier's leading-indicator policy reads (see the module docstring)."""

    previewing: int = 0
    finalize_share: float = 0.0
    preview_to_finalize_s: float = 0.0
    finalize_steps: float = 0.0
    starts_per_s: float = 0.0
    taken_at: float = 0.0  # wall clock (time.time), to age out a silent source
    measured_sessions: int = 0  # the mature sessions `finalize_share` and `preview_to_finalize_s` rest on
    preview_to_finalize_sd_s: float = 0.0
    previewing_by_age: tuple[int, ...] = ()  # AGE_BIN_S bins (module docstring)

    def __post_init__(self) -> None:
        # a dict sent between processes carries the bins as a list
        object.__setattr__(self, "previewing_by_age", tuple(int(n) for n in self.previewing_by_age))

    def to_dict(self) -> dict[str, float | list[int]]:
        return {**asdict(self), "previewing_by_age": list(self.previewing_by_age)}


def merge_activity(activities: Iterable[SessionActivity]) -> SessionActivity:
    """Several ingress replicas' views as one: sessions add up, measured figures are session-weighted."""
    items = list(activities)
    previewing = sum(a.previewing for a in items)
    weights = [max(1, a.previewing) for a in items]

    def mean(name: str) -> float:
        pairs = [(getattr(a, name), w) for a, w in zip(items, weights, strict=True) if getattr(a, name) > 0]
        return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else 0.0

    bins = max((len(a.previewing_by_age) for a in items), default=0)
    return SessionActivity(
        previewing=previewing,
        finalize_share=mean("finalize_share"),
        preview_to_finalize_s=mean("preview_to_finalize_s"),
        finalize_steps=mean("finalize_steps"),
        starts_per_s=sum(a.starts_per_s for a in items),
        taken_at=max((a.taken_at for a in items), default=0.0),
        measured_sessions=sum(a.measured_sessions for a in items),
        preview_to_finalize_sd_s=mean("preview_to_finalize_sd_s"),
        previewing_by_age=tuple(
            sum(a.previewing_by_age[i] for a in items if i < len(a.previewing_by_age)) for i in range(bins)
        ),
    )


@dataclass
class _Session:
    started: float
    last: float
    lead_s: float | None = None  # first preview to finalize, once finalized
    rounds: int = 1  # previews made in the session so far

    @property
    def round_bucket(self) -> int:
        """The round its finalize chance is counted under."""
        return min(self.rounds, MAX_ROUND)


MAX_ROUND = 8  # rounds beyond this share one finalize chance (few sessions get there)
MIN_ROUND_OUTCOMES = 5  # outcomes of a round before its finalize chance is read (else unknown: None)
# a preview is worth preparing an edit of unless this share of its round's sessions finalize there: the
# preparation runs on idle capacity only, so it need not pay for itself, only be used now and then
EDIT_LIKELY_BELOW_FINALIZE_CHANCE = 0.9


def edit_likely(finalize_chance: float | None) -> bool:
    """Whether a preview whose session finalizes at its round with `finalize_chance` (None: not measured
    yet) may well be edited next (`engine.edit_preparation`)."""
    return finalize_chance is None or finalize_chance < EDIT_LIKELY_BELOW_FINALIZE_CHANCE


class SessionTracker:
    def __init__(
        self,
        idle_s: float = 120.0,
        history: int = 200,
        max_sessions: int = 100_000,
        rate_window_s: float = 20.0,  # follows a ramp within seconds, over tens of starts (less noise)
        mature_s: float | None = None,  # a session's outcome counts this long after its start (2 x idle_s)
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        mature_s = 2.0 * idle_s if mature_s is None else mature_s
        if idle_s <= 0 or history < 1 or max_sessions < 1 or rate_window_s <= 0 or mature_s <= 0:
            raise ValueError("idle_s, rate_window_s and mature_s must be > 0, history and max_sessions >= 1")
        self.rate_window_s = rate_window_s
        self.mature_s = mature_s
        self._cohort: deque[_Session] = deque(maxlen=max_sessions)  # started, not yet mature, oldest first
        self._starts: deque[float] = deque()  # start times of the sessions of the last rate_window_s
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._wall_clock = wall_clock
        self._by_preview: OrderedDict[str, _Session] = OrderedDict()  # preview id -> its session
        self._sessions: dict[int, _Session] = {}  # id(session) -> session, the open ones
        self._ended: deque[bool] = deque(maxlen=history)  # mature sessions: finalized?
        self._lead_s: deque[float] = deque(maxlen=history)
        self._steps: deque[float] = deque(maxlen=history)
        # (round, finalized there?): what recent sessions did after a round's preview
        self._round_outcomes: deque[tuple[int, bool]] = deque(maxlen=history)

    def preview(self, preview_id: str, parent_id: str | None = None) -> None:
        """A preview was made: `parent_id` (the preview it edits) joins its session, else it starts one."""
        now = self._clock()
        session = self._by_preview.get(parent_id) if parent_id else None
        if session is None:
            session = _Session(started=now, last=now)
            self._sessions[id(session)] = session
            self._cohort.append(session)
            self._starts.append(now)
        elif id(session) in self._sessions:  # it previewed again instead of finalizing that round
            self._round_outcomes.append((session.round_bucket, False))
            session.rounds += 1
        session.last = now
        self._by_preview[preview_id] = session
        self._by_preview.move_to_end(preview_id)
        while len(self._by_preview) > self.max_sessions:
            self._by_preview.popitem(last=False)

    def finalize(self, preview_id: str | None, cloud_steps: int) -> None:
        """A finalize of `preview_id` ran `cloud_steps` steps on the cloud tier (0: routed elsewhere)."""
        now = self._clock()
        if cloud_steps > 0:
            self._steps.append(float(cloud_steps))
        session = self._by_preview.get(preview_id) if preview_id else None
        if session is None or id(session) not in self._sessions:
            return  # an image sent inline, a session already finalized, or one forgotten
        del self._sessions[id(session)]
        session.lead_s = now - session.started
        self._round_outcomes.append((session.round_bucket, True))

    def finalize_chance(self, preview_id: str) -> float | None:
        """The share of recent sessions at this preview's round that finalized at that round (module
        docstring); None while fewer than `MIN_ROUND_OUTCOMES` sessions have left that round, or for a
        preview the tracker does not follow."""
        session = self._by_preview.get(preview_id)
        if session is None or id(session) not in self._sessions:
            return None
        self._expire(self._clock())
        at = session.round_bucket
        outcomes = [finalized for round_, finalized in self._round_outcomes if round_ == at]
        if len(outcomes) < MIN_ROUND_OUTCOMES:
            return None
        return sum(outcomes) / len(outcomes)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if now - s.last > self.idle_s]:
            session = self._sessions.pop(key)
            self._round_outcomes.append((session.round_bucket, False))  # went idle at that round

    def _measure(self, now: float) -> None:
        """Counts the outcome of every session that has become mature."""
        while self._cohort and now - self._cohort[0].started >= self.mature_s:
            session = self._cohort.popleft()
            self._ended.append(session.lead_s is not None)
            if session.lead_s is not None:
                self._lead_s.append(session.lead_s)

    def activity(self) -> SessionActivity:
        now = self._clock()
        self._expire(now)
        self._measure(now)
        while self._starts and now - self._starts[0] > self.rate_window_s:
            self._starts.popleft()
        ended = list(self._ended)
        leads = list(self._lead_s)
        by_age = [0] * AGE_BINS
        for session in self._sessions.values():
            by_age[min(AGE_BINS - 1, int((now - session.started) / AGE_BIN_S))] += 1
        return SessionActivity(
            previewing=len(self._sessions),
            finalize_share=sum(ended) / len(ended) if ended else 0.0,
            preview_to_finalize_s=sum(self._lead_s) / len(self._lead_s) if self._lead_s else 0.0,
            finalize_steps=sum(self._steps) / len(self._steps) if self._steps else 0.0,
            starts_per_s=len(self._starts) / self.rate_window_s,
            taken_at=self._wall_clock(),
            measured_sessions=len(ended),
            preview_to_finalize_sd_s=statistics.pstdev(leads) if len(leads) > 1 else 0.0,
            previewing_by_age=tuple(by_age),
        )
