"""Progress as a stream: run a coroutine that reports progress through a callback, and iterate over its
reports followed by its result.

Both ends of a streamed request use it: a tier replica turns a model-loop job into a stream that Ray
Serve carries to the ingress (a generator method called with `handle.options(stream=True)`), and the
ingress turns a workflow into server-sent events. The consumer going away (the generator closed or
cancelled: the HTTP client disconnected) cancels the coroutine, and with it the work it waits for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

Report = Callable[..., None]
PROGRESS, RESULT = "progress", "result"


async def stream_progress(run: Callable[[Report], Awaitable[Any]]) -> AsyncGenerator[tuple[str, Any], None]:
    """Runs `run(report)` and yields `("progress", args)` for each `report(*args)`, in order, then
    `("result", value)` (or raises its error). Closing the iterator early cancels the run."""
    queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    task = asyncio.ensure_future(run(lambda *args: queue.put_nowait(args)))
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield PROGRESS, getter.result()
                continue
            while not queue.empty():  # reports made just before the end
                yield PROGRESS, queue.get_nowait()
            yield RESULT, task.result()
            return
    finally:
        if not task.done():
            task.cancel()
