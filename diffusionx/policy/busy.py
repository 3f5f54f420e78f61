"""How busy a replica has recently been: the share of recent time it held foreground work.

An instantaneous snapshot of a replica's pool says little about a tier under load: between two requests
a busy replica is idle for a moment, and a speculation submitted in that moment takes the cores the next
foreground request needs (on a CPU, or wherever tiers share a machine). The speculation policy therefore
also reads the recent busy share, an exponentially decaying average of busy (1) and idle (0) time with
time constant `tau_s`: at twice the tier's capacity it stays near 1, at 0.3x near 0.3.
No library keeps this per replica for us (Serve's autoscaling metrics are averaged per deployment and
live in the controller), so it is kept here, beside the monitor that sees work enter and leave.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class BusyShare:
    """Exponentially decaying share of busy time; `update(busy, now)` at every change of state (and
    whenever read), `now` from an injected clock in seconds."""

    tau_s: float = 10.0
    share: float = 0.0
    busy: bool = False
    since: float | None = None  # when `share` was last brought up to date

    def update(self, busy: bool, now: float) -> float:
        """Accounts for the time since the last update at the state that held, then records `busy`."""
        if self.since is not None and now > self.since:
            keep = math.exp(-(now - self.since) / self.tau_s)
            self.share = self.share * keep + (1.0 if self.busy else 0.0) * (1.0 - keep)
        if self.since is None or now > self.since:
            self.since = now
        self.busy = busy
        return self.share

    def at(self, now: float) -> float:
        """The share up to `now` (the current state continued), without recording anything."""
        if self.since is None or now <= self.since:
            return self.share
        keep = math.exp(-(now - self.since) / self.tau_s)
        return self.share * keep + (1.0 if self.busy else 0.0) * (1.0 - keep)
