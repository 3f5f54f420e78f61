"""DiffusionX clients: the Python HTTP client with multi-round sessions, the demo and the benchmarks.

Importing this package loads httpx and Pillow only (not torch, not Ray).
"""

from clients.client import (
    DEFAULT_URL,
    AsyncDiffusionXClient,
    AsyncSession,
    DiffusionXClient,
    Round,
    Session,
)
from clients.errors import (
    ConnectionFailed,
    DiffusionXError,
    InvalidRequest,
    Overloaded,
    PreviewExpired,
    RateLimited,
    RequestTimeout,
    ServerError,
)
from clients.results import (
    GenerateResult,
    HealthResult,
    PreviewResult,
    ProgressEvent,
    RefineResult,
    StatsResult,
    TierStats,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncDiffusionXClient",
    "AsyncSession",
    "ConnectionFailed",
    "DiffusionXClient",
    "DiffusionXError",
    "GenerateResult",
    "HealthResult",
    "InvalidRequest",
    "Overloaded",
    "PreviewExpired",
    "PreviewResult",
    "ProgressEvent",
    "RateLimited",
    "RefineResult",
    "RequestTimeout",
    "Round",
    "ServerError",
    "Session",
    "StatsResult",
    "TierStats",
]
