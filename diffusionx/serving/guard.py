"""The HTTP boundary in front of the API routes, as plain ASGI middleware (no Ray, no FastAPI; tested
in-process): everything that must be refused before a body is parsed or a route runs.

In order, for every HTTP request:
1. API keys (optional): with keys configured, every path but the public ones (`/v1/health`) needs
   `Authorization: Bearer <key>`; a missing or wrong key gets 401. The presented key is compared with every
   configured key by `hmac.compare_digest`, all of them, without an early exit, and a missing key is
   compared like a wrong one, so the answer time says nothing about the keys. The matching key's owner id
   (a hash, never the key) goes to `scope["state"]["owner"]`; previews are scoped to it.
2. Body size: a body over `max_body_bytes` gets 413, decided from Content-Length before reading and
   checked again while reading (a chunked body cannot sneak past).
3. Body content: a POST body must be UTF-8 JSON without NaN/Infinity (which JSON does not allow and
   Python's parser accepts); anything else gets 422. The checked body is replayed to the route.

Errors use the API's error body, `{"error": message, "status": code}`, and say what is allowed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from diffusionx.policy.tenants import ApiKey, as_api_key, parse_key_line

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 12 * 1024 * 1024  # a 1024x1024 PNG in base64 (<= 8 MiB characters) plus the other fields
PUBLIC_PATHS = frozenset({"/v1/health"})
API_KEYS_FILE_ENV = "DIFFUSIONX_API_KEYS_FILE"


def load_api_keys(
    configured: Iterable[str | ApiKey | Mapping] | None = None, environ: dict[str, str] | None = None
) -> list[ApiKey]:
    """The API keys in force: those configured (plain strings or keys with a weight and a rate), plus one
    per non-empty line (without `#` comments) of the file named by DIFFUSIONX_API_KEYS_FILE
    (`key [weight=W] [rate_per_s=R] [burst=B]`). An empty list means no keys: the API is open."""
    keys = [as_api_key(k) for k in configured or () if not isinstance(k, str) or k.strip()]
    path = (os.environ if environ is None else environ).get(API_KEYS_FILE_ENV)
    if path:
        keys += [key for line in Path(path).read_text().splitlines() if (key := parse_key_line(line))]
    return keys


def owner_of(key: str) -> str:
    """The owner id of a key: stable, short, and not the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def check_json(body: bytes) -> str | None:
    """None if `body` is UTF-8 JSON without NaN/Infinity, else what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"body is not UTF-8 (byte {error.start}); send UTF-8 JSON"
    try:
        json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        if "is not a JSON number" in str(error):
            return f"body is not valid JSON: {error} (NaN and Infinity are not allowed; use finite numbers)"
        return f"body is not valid JSON ({error}); send a JSON object"
    return None


class BodyTooLarge(Exception):
    pass


class GuardConfig:
    """What the guard enforces: the API keys (none: open) and the body limit."""

    def __init__(self, api_keys: Iterable[str | ApiKey] = (), max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._keys = [(k.encode(), owner_of(k)) for k in (as_api_key(k).key for k in api_keys)]
        self.max_body_bytes = max_body_bytes

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> str | None:
        """The owner id of the bearer key in `authorization`, or None if it is missing or wrong."""
        presented = b""
        if authorization and authorization[:7].lower() == "bearer ":
            presented = authorization[7:].strip().encode()
        owner = None
        for key, key_owner in self._keys:  # every key, no early exit
            if hmac.compare_digest(presented, key):
                owner = key_owner
        return owner if presented else None


class Guard:
    """ASGI middleware; `config` is a GuardConfig or a function returning the one in force (the server
    sets it when a replica starts, after the app was built)."""

    def __init__(self, app: ASGIApp, config: GuardConfig | Callable[[], GuardConfig]) -> None:
        self.app = app
        self._config = config

    @property
    def config(self) -> GuardConfig:
        return self._config if isinstance(self._config, GuardConfig) else self._config()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = self.config
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # 1. API keys
        owner = ""
        if config.keys_required and scope.get("path") not in PUBLIC_PATHS:
            authenticated = config.authenticate(headers.get("authorization"))
            if authenticated is None:
                await _error(send, 401, "missing or wrong API key: send Authorization: Bearer <key>")
                return
            owner = authenticated
        scope.setdefault("state", {})["owner"] = owner
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        # 2. body size, before reading
        length = headers.get("content-length", "")
        limit = config.max_body_bytes
        if length.isdigit() and int(length) > limit:
            await _error(send, 413, _too_large(f"{int(length)} bytes", limit))
            return
        try:
            body = await _read(receive, limit)
        except BodyTooLarge:
            await _error(send, 413, _too_large(f"more than {limit} bytes", limit))
            return
        except ConnectionAbortedError:
            return  # nobody to answer
        # 3. body content
        problem = check_json(body)
        if problem is not None:
            await _error(send, 422, problem)
            return
        await self.app(scope, _replay(body, receive), send)


def _too_large(size: str, limit: int) -> str:
    return f"request body is {size}; at most {limit} bytes are allowed"


async def _read(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            raise ConnectionAbortedError("client disconnected before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notices as usual

    return replayed


async def _error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
