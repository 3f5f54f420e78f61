"""Fakes shared by the test files: a clock, a gated model runner, fake models and step engines for the model
loop, a fake HTTP server of the API for the clients, and a PNG header that claims any size."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class GatedRunner:
    """Runs model calls inline, but each waits until the test opens the gate: the model is 'busy' until
    then. Every call advances the fake clock by `seconds` (the model's time)."""

    def __init__(self, clock: FakeClock, seconds: float = 0.5) -> None:
        self.clock, self.seconds = clock, seconds
        self.gate = asyncio.Event()
        self.calls = 0

    async def __call__(self, function, *args):
        self.calls += 1
        await asyncio.sleep(0)  # a real model call yields to the event loop (it runs in a thread)
        await self.gate.wait()
        self.clock.now += self.seconds
        return function(*args)


@dataclass
class Result:
    value: str
    timings_ms: dict = field(default_factory=dict)


class FakeModel:
    """A whole-batch model: records each batch; raises for a request named 'bad' (a model-call failure)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, requests: list[str]) -> list[Result]:
        self.batches.append(list(requests))
        if "bad" in requests:
            raise RuntimeError("model failed on 'bad'")
        return [Result(r.upper()) for r in requests]


@dataclass(eq=False)
class FakeTicket:
    request: tuple[str, int]
    result: Result | None = None
    error: BaseException | None = None
    steps_run: int = 0

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class FakeStepper:
    """Advances every sample one step per `step`; a sample named 'boom' makes its step fail."""

    def __init__(self) -> None:
        self.pool: list[FakeTicket] = []
        self.steps = 0

    def add(self, request: tuple[str, int]) -> FakeTicket:
        name, steps = request
        if name == "invalid":
            raise ValueError("invalid request")
        ticket = FakeTicket(request)
        if steps == 0:
            ticket.result = Result(name)
        else:
            self.pool.append(ticket)
        return ticket

    def step(self) -> list[FakeTicket]:
        self.steps += 1
        if any(t.request[0] == "boom" for t in self.pool):
            for ticket in self.pool:
                ticket.error = RuntimeError("step failed")
            failed, self.pool = self.pool, []
            return failed
        for ticket in self.pool:
            ticket.steps_run += 1
        finished = [t for t in self.pool if t.steps_run == t.request[1]]
        for ticket in finished:
            ticket.result = Result(ticket.request[0], {})
            ticket.result.batch_size = len(self.pool)  # type: ignore[attr-defined]
        self.pool = [t for t in self.pool if t not in finished]
        return finished

    def priorities(self) -> list[tuple[int, int]]:
        left = [ticket.request[1] - ticket.steps_run for ticket in self.pool]
        return [(remaining, remaining) for remaining in sorted(left)]

    def cancel(self, ticket: FakeTicket) -> bool:
        kept = [t for t in self.pool if t is not ticket]
        removed, self.pool = len(kept) < len(self.pool), kept
        return removed

    @property
    def idle(self) -> bool:
        return not self.pool

    @property
    def has_foreground(self) -> bool:  # no background class here (see test_background_loop)
        return bool(self.pool)


URL = "http://diffusionx.test"


def png_base64(color: tuple[int, int, int], size: int = 16) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _is_edit(body: dict[str, Any]) -> bool:
    return "preview_id" in body or "image" in body


class FakeServer:
    """Answers the API like the ingress does. `forget_ids` makes every preview id unknown (404)."""

    def __init__(self, forget_ids: bool = False) -> None:
        self.forget_ids = forget_ids
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.previews: dict[str, str] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        self.requests.append((path, body))
        if "preview_id" in body and (self.forget_ids or body["preview_id"] not in self.previews):
            message = f"preview_id '{body['preview_id']}' is unknown or has expired; send the image itself"
            return httpx.Response(404, json={"error": message, "status": 404})
        if path == "/v1/preview":
            size = body.get("width", 16)
            preview_id = f"p{len(self.previews)}"
            image = png_base64((10 * len(self.previews), 0, 0), size)
            self.previews[preview_id] = image
            return httpx.Response(
                200,
                json={
                    "preview_id": preview_id,
                    "image": image,
                    "seed": body["seed"],
                    "width": size,
                    "height": size,
                    "num_inference_steps": 8,
                    # an edit without a strength: the edit predictor's pick
                    "strength": body.get("strength", 0.75 if _is_edit(body) else None),
                    "unet_calls": {"cloud": 0, "edge": 8, "approximated": 0},
                    "timings_ms": {"model_total": 12.5, "queue": 1.0, "batch_size": 2.0},
                },
            )
        if path == "/v1/refine":
            return httpx.Response(
                200,
                json={
                    "image": png_base64((0, 200, 0)),
                    "seed": body["seed"],
                    "strength_predicted": 0.42,
                    "strength_used": body.get("strength", 0.42),
                    "num_inference_steps": 20,
                    "route": "cloud",
                    "reason": "light load",
                    "load": {"queued_steps": 0.0},
                    "unet_calls": {"cloud": 8, "edge": 0, "approximated": 0},
                    "timings_ms": {"model_total": 30.0},
                },
            )
        return httpx.Response(404, json={"error": f"no route {path}", "status": 404})


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is empty: a bomb's header is enough)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def two_round_frontend(tiers: Any, capacity: dict[str, int]) -> Any:
    """The ingress's `Frontend` over `tiers`, with an in-memory preview store, no observer, and a session
    tracker that has measured enough sessions of two rounds (each edited its first preview and finalized
    its edit) to read each round's finalize chance: 0 at round 1, 1 at round 2."""
    from diffusionx.policy.admission import AdmissionControl
    from diffusionx.policy.sessions import MIN_ROUND_OUTCOMES, SessionTracker
    from diffusionx.serving.frontend import Frontend
    from diffusionx.serving.preview_store import PreviewStore

    sessions = SessionTracker()
    for n in range(MIN_ROUND_OUTCOMES):
        sessions.preview(f"s{n}-1")
        sessions.preview(f"s{n}-2", parent_id=f"s{n}-1")
        sessions.finalize(f"s{n}-2", cloud_steps=5)
    pngs: dict[tuple[str, str], bytes] = {}

    async def put(png: bytes, preview_id: str, owner: str) -> object:
        pngs[(preview_id, owner)] = png
        return preview_id

    async def get(preview_id: str, owner: str) -> bytes | None:
        return pngs.get((preview_id, owner))

    class Observer:
        def request_done(self, endpoint: str, route: str, seconds: float) -> None:
            pass

    admission = AdmissionControl(capacity, max_wait_s=10.0)
    return Frontend(tiers, admission, PreviewStore(put, get), Observer(), sessions)
