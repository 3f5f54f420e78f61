"""Typed client exceptions, and the mapping from an HTTP error response to one of them.

The server answers errors as `{"error": message, "status": code}`. The mapping keeps the server's message
verbatim and picks the class from the status: 4xx -> `InvalidRequest` (404 on a request that named a
`preview_id` -> `PreviewExpired`; 429 -> `RateLimited`), 503 -> `Overloaded` (both with the Retry-After
seconds), other 5xx ->
`ServerError`. Transport failures (refused connection, timeout) become `ConnectionFailed`.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx


class DiffusionXError(Exception):
    """Base class of every error the client raises. `status` is the HTTP status (None without one)."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body

    def __str__(self) -> str:
        return self.message if self.status is None else f"[{self.status}] {self.message}"


class InvalidRequest(DiffusionXError):
    """The server rejected the request as given (4xx); the message says what is wrong and what is allowed."""


class PreviewExpired(InvalidRequest):
    """404 on a request that referred to a preview by id: the id is unknown or has left the server's cache.

    Resend the image itself (a `Session` does this by itself).
    """

    def __init__(
        self, message: str, status: int | None = 404, body: Any = None, preview_id: str = ""
    ) -> None:
        super().__init__(message, status, body)
        self.preview_id = preview_id


class RateLimited(InvalidRequest):
    """429: this API key is over its rate. `retry_after_s` is the server's Retry-After in seconds."""

    def __init__(
        self, message: str, status: int | None = 429, body: Any = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status, body)
        self.retry_after_s = retry_after_s


class ServerError(DiffusionXError):
    """The server failed (5xx)."""


class Overloaded(ServerError):
    """503: the server sheds load. `retry_after_s` is the server's Retry-After in seconds (None if absent)."""

    def __init__(
        self, message: str, status: int | None = 503, body: Any = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status, body)
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> float | None:
        """Alias of `retry_after_s`."""
        return self.retry_after_s


class ConnectionFailed(DiffusionXError):
    """The server could not be reached, or did not answer in time (no HTTP status)."""


class RequestTimeout(ConnectionFailed):
    """The request got no complete answer within the client's timeout."""


def parse_retry_after(value: str | None, now_s: float | None = None) -> float | None:
    """Retry-After as seconds from now: either delta-seconds (`"2"`, `"0.5"`) or an HTTP date; None if unset
    or unreadable. Never negative."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now_s is None else now_s))


def _error_message(response: httpx.Response) -> tuple[str, Any]:
    """The server's message and the decoded body; understands our `{"error"}` and FastAPI's `{"detail"}`."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return (text[:500] or response.reason_phrase or "no message"), text
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            return body["error"], body
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail, body
        if isinstance(detail, list):  # FastAPI validation errors: [{"loc": [...], "msg": "..."}]
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                    parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            if parts:
                return "; ".join(parts), body
    return str(body)[:500], body


def error_from_response(response: httpx.Response, preview_id: str | None = None) -> DiffusionXError:
    """The typed exception for a non-2xx response. `preview_id` is the id the request named, if any."""
    status = response.status_code
    message, body = _error_message(response)
    if status == 404 and preview_id:
        return PreviewExpired(message, status, body, preview_id=preview_id)
    if status in (429, 503):
        retry_after_s = parse_retry_after(response.headers.get("retry-after"))
        kind = RateLimited if status == 429 else Overloaded
        return kind(message, status, body, retry_after_s=retry_after_s)
    if 400 <= status < 500:
        return InvalidRequest(message, status, body)
    if status >= 500:
        return ServerError(message, status, body)
    return DiffusionXError(f"unexpected HTTP status {status}: {message}", status, body)
