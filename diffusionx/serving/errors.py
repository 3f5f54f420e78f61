"""The errors the HTTP ingress answers with a status of its own (the exception handlers' mapping)."""

from __future__ import annotations

from diffusionx.requests import InvalidRequestError

RETRY_AFTER_S = 1  # a tier's own full queue (the backstop behind admission control)
REPLACEMENT_RETRY_AFTER_S = 2  # a replica died and its retry failed too: the replacement is starting


class PreviewNotFound(LookupError):
    """404: a preview id that is unknown, expired, or another key's."""


class TierOverloaded(RuntimeError):
    """503 with Retry-After: a tier's queue is full or admission control refused the work."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(TierOverloaded):
    """429 with Retry-After: the request's API key is over its rate."""


class ReplicaGone(TierOverloaded):
    """503 with Retry-After: a tier call's replica died, and so did its retry (the replacement is
    starting). A caller that can redo the lost work elsewhere (an EC-Diff plan) catches this one."""

    def __init__(self, message: str) -> None:
        super().__init__(message, REPLACEMENT_RETRY_AFTER_S)


def status_of(error: Exception) -> int:
    """The HTTP status of an error that ends an event stream (the ingress's exception handlers' mapping)."""
    if isinstance(error, InvalidRequestError):
        return 422
    if isinstance(error, PreviewNotFound):
        return 404
    if isinstance(error, RateLimited):
        return 429
    if isinstance(error, TierOverloaded):
        return 503
    return 500
