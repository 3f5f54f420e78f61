"""Preparing a session's next edit while the edge replica is idle.

A preview (or edit) the edge answers is the input of the session's next edit, seconds later: that edit
VAE-encodes it, and its strength prediction embeds it with the alignment model (CLIP), both before any of
its UNet steps run. Neither depends on the next prompt. So when the ingress has answered an image that its
session will probably edit (`policy.sessions.edit_likely`), it asks the edge tier to prepare that edit
(`EdgeModel.prepare_edit`); the replica computes both once it has no request and (on a CPU host) the host
has a core and a half free of other processes (the gate of speculative refinement,
`engine.host_share.HostIdle`), and keeps them by pixels (`imaging.image_key`): the edit that arrives with
the same image takes them instead of computing them. What is prepared and never used (the session
finalized, or its edit went to another edge replica) is a VAE encode and an image embedding, on capacity
nobody else wanted.

The latents come from an encode of the image alone; an edit that encodes its input in a batch with others
gets them equal up to floating-point rounding, so the in-process tiers (the experiments, whose figures are
deterministic) leave this off and the deployment turns it on (`prepare_edits` in the app args).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from cachetools import LRUCache
from PIL import Image

from diffusionx.engine.model_loop import RunBlocking
from diffusionx.imaging import image_key
from diffusionx.models.loading import LoadedModel
from diffusionx.sampling.generation import encode_images

logger = logging.getLogger(__name__)

PREPARED_ENTRIES = 256  # latents of the recent sessions' last images (4 x 64 x 64 floats each for SD v1.5)
PREPARE_WITHIN_S = 2.0  # a session's next edit comes after a person's think time; later it is not waited for
PREPARE_POLL_S = 0.02


@runtime_checkable
class PreparesImages(Protocol):
    """A strength predictor that can compute beforehand what its predictions take from an image
    (`policy.learned.LearnedStrengthPredictor.prepare`)."""

    def prepare(self, images: Sequence[Image.Image]) -> None: ...


class EncodedImages:
    """x_0 latents of images encoded beforehand by one model's VAE, by pixels (least recently used leave
    first). Thread-safe: preparing runs in a worker thread beside the edits that read it."""

    def __init__(self, model: LoadedModel, max_entries: int = PREPARED_ENTRIES) -> None:
        self.model = model
        self._latents: LRUCache[bytes, torch.Tensor] = LRUCache(maxsize=max_entries)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        # (hits, misses) of each encode, e.g. for a metric (from the worker thread that runs the edit)
        self.on_lookup: Callable[[int, int], None] = lambda hits, misses: None

    def prepare(self, image: Image.Image) -> None:
        key = image_key(image.convert("RGB"))
        latents = encode_images(self.model, [image])[0]
        with self._lock:
            self._latents[key] = latents

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, C, h, w) latents: the prepared ones, and the others encoded now in one batch."""
        keys = [image_key(image.convert("RGB")) for image in images]
        with self._lock:
            rows: list[torch.Tensor | None] = [self._latents.get(key) for key in keys]
            missing = [i for i, row in enumerate(rows) if row is None]
            self.hits += len(rows) - len(missing)
            self.misses += len(missing)
        self.on_lookup(len(rows) - len(missing), len(missing))
        if missing:
            for i, row in zip(missing, encode_images(self.model, [images[i] for i in missing]), strict=True):
                rows[i] = row
        return torch.stack([row for row in rows if row is not None])


class EditPreparation:
    """Schedules the work of the next edit of an image the edge answered (`prepare_later`), run when
    `idle()` says so within `PREPARE_WITHIN_S`, through the tier's `run_blocking` (which takes turns with its
    model calls where the model computes on the host's CPU)."""

    def __init__(
        self,
        model: LoadedModel,
        run_blocking: RunBlocking,
        idle: Callable[[], bool],
        predictor: Callable[..., float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        within_s: float = PREPARE_WITHIN_S,
    ) -> None:
        self.encoded = EncodedImages(model)
        self._run_blocking = run_blocking
        self._idle = idle
        self._predictor = predictor if isinstance(predictor, PreparesImages) else None
        self._clock = clock
        self._within_s = within_s
        self._tasks: set[asyncio.Task] = set()
        self.prepared = 0
        self.skipped = 0
        self.on_result: Callable[[str], None] = lambda result: None  # prepared | skipped | failed

    def prepare_later(self, image: Image.Image) -> None:
        """Prepares the next edit of `image` once idle (on the event loop; returns at once)."""
        task = asyncio.get_running_loop().create_task(self._prepare_when_idle(image))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prepare_when_idle(self, image: Image.Image) -> None:
        deadline = self._clock() + self._within_s
        while not self._idle():
            if self._clock() >= deadline:
                self.skipped += 1
                self.on_result("skipped")
                return
            await asyncio.sleep(PREPARE_POLL_S)
        try:
            await self._run_blocking(self._prepare, image)
        except Exception:  # only an optimisation: the edit then computes what it needs itself
            logger.warning("preparing an edit's input failed", exc_info=True)
            self.on_result("failed")
            return
        self.prepared += 1
        self.on_result("prepared")

    def _prepare(self, image: Image.Image) -> None:
        self.encoded.prepare(image)
        if self._predictor is not None:
            self._predictor.prepare([image])

    async def drain(self) -> None:
        """Waits for the preparations in flight (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
