"""The edge tier prepares a session's next edit while idle (`engine.edit_preparation`): the image's latents
and its alignment embedding, kept by pixels and taken by the edit of that image."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionx.engine.edit_preparation import EditPreparation, EncodedImages
from diffusionx.engine.tiers import EdgeModel
from diffusionx.models.alignment import load_alignment_model
from diffusionx.policy.features import TextEmbedder
from diffusionx.requests import EditRequest, Img2ImgRequest, PreviewRequest
from diffusionx.sampling.generation import edit, encode_images
from tests.fakes import two_round_frontend

PROMPT = "a large red circle on the left and a small blue square on the right, white background"
EDITED = "a large green circle on the left and a small blue square on the right, white background"


def picture(seed: int, size: int = 32) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_prepared_latents_are_the_encode_of_the_image_alone_and_only_missing_ones_are_encoded(tiny_edge):
    encoded = EncodedImages(tiny_edge)
    first, second = picture(1), picture(2)
    encoded.prepare(first)
    both = encoded.encode([Image.fromarray(np.asarray(first)), second])  # same pixels, another object
    assert (encoded.hits, encoded.misses) == (1, 1)
    assert torch.equal(both[0], encode_images(tiny_edge, [first])[0])
    assert torch.equal(both[1], encode_images(tiny_edge, [second])[0])


def test_an_edit_of_a_prepared_image_gives_the_same_pixels_as_one_that_encodes_it(tiny_edge):
    encoded = EncodedImages(tiny_edge)
    request = Img2ImgRequest(EDITED, picture(3), 0.5, seed=4, num_inference_steps=6)
    plain = edit(tiny_edge, [request])[0]
    encoded.prepare(request.image)
    prepared = edit(tiny_edge, [request], encode=encoded.encode)[0]
    assert encoded.hits == 1
    assert np.array_equal(np.asarray(plain.image), np.asarray(prepared.image))
    assert prepared.unet_calls == plain.unet_calls


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def in_line(function, *args):
    return function(*args)


def test_preparation_waits_for_idle_and_gives_up_after_its_window(tiny_edge):
    clock, idle = Clock(), [False]
    preparation = EditPreparation(tiny_edge, in_line, idle=lambda: idle[0], clock=clock, within_s=1.0)

    async def scenario():
        preparation.prepare_later(picture(5))
        await asyncio.sleep(0.05)  # busy: polled, not prepared
        assert preparation.prepared == 0 and preparation.skipped == 0
        idle[0] = True
        await preparation.drain()
        assert preparation.prepared == 1
        idle[0] = False
        preparation.prepare_later(picture(6))
        await asyncio.sleep(0.03)
        clock.now = 1.0  # the window has passed while busy: skipped
        await preparation.drain()
        assert (preparation.prepared, preparation.skipped) == (1, 1)

    asyncio.run(scenario())
    assert preparation.encoded.encode([picture(5)]) is not None and preparation.encoded.hits == 1


def test_a_failed_preparation_is_logged_and_the_edit_encodes_its_input_itself(tiny_edge, caplog):
    async def failing(function, *args):
        raise RuntimeError("no memory")

    preparation = EditPreparation(tiny_edge, failing, idle=lambda: True)

    async def scenario():
        preparation.prepare_later(picture(7))
        await preparation.drain()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert "preparing an edit's input failed" in caplog.text and preparation.prepared == 0
    preparation.encoded.encode([picture(7)])
    assert (preparation.encoded.hits, preparation.encoded.misses) == (0, 1)


class PreparingPredictor:
    """An edit predictor that records what it was asked to prepare and what it predicted for."""

    def __init__(self) -> None:
        self.prepared: list[bytes] = []
        self.predicted: list[bytes] = []

    def prepare(self, images: Sequence[Image.Image]) -> None:
        self.prepared.extend(image.tobytes() for image in images)

    def __call__(self, prompt: str, image: Image.Image, previous_prompt: str | None = None) -> float:
        self.predicted.append(image.tobytes())
        return 0.5


def test_the_edge_prepares_an_image_when_asked_and_the_next_edit_of_it_takes_it(tiny_edge):
    predictor = PreparingPredictor()
    edge = EdgeModel(tiny_edge, 4, edit_steps=6, predict_edit=predictor, prepare_edits=True)
    assert edge.preparation is not None

    async def session():
        assert (await edge.info())["prepares_edits"] is True
        preview = await edge.preview(PreviewRequest(PROMPT, seed=1))
        await edge.prepare_edit(preview.image)
        await edge.preparation.drain()
        edited = await edge.edit_predicted(EditRequest(EDITED, preview.image, PROMPT, seed=1))
        return preview, edited

    preview, _edited = asyncio.run(session())
    assert predictor.prepared == [preview.image.tobytes()] == predictor.predicted
    assert edge.preparation.encoded.hits == 1 and edge.preparation.encoded.misses == 0
    plain = EdgeModel(tiny_edge, 4)  # off unless asked for (in-process experiments)
    assert plain.preparation is None and "prepares_edits" not in asyncio.run(plain.info())
    asyncio.run(plain.prepare_edit(preview.image))  # nothing to do


def test_alignment_embeddings_are_cached_by_pixels_and_padding_to_the_longest_text_changes_none():
    clip = load_alignment_model("tiny-random-clip", device="cpu")
    clip.clear_cache()
    image = picture(8)
    first = clip.image_embeddings([image])
    again = clip.image_embeddings([Image.fromarray(np.asarray(image)), picture(9)])
    assert np.array_equal(first[0], again[0]) and len(clip._image_cache) == 2
    texts = ["a red circle", "a large red circle on the left and a small blue square on the right"]
    longest = clip.text_embeddings(texts)
    padded = clip.tokenizer(texts, padding="max_length", max_length=clip.tokenizer.model_max_length)
    with torch.no_grad():
        out = clip.model.get_text_features(**{k: torch.tensor(v) for k, v in padded.items()})
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    full = torch.nn.functional.normalize(out.float(), dim=-1).numpy()
    assert longest == pytest.approx(full, abs=1e-5)


def test_the_previous_prompts_token_ids_are_those_the_encoder_reads():
    embedder = TextEmbedder.load("tiny-random")
    _, ids, _ = embedder.encode([PROMPT, EDITED])
    assert np.array_equal(embedder.token_ids([PROMPT, EDITED]), ids)


def test_the_ingress_asks_the_edge_to_prepare_previews_their_sessions_will_probably_edit(tiny_edge):
    """Sessions of two rounds, once five were measured: a first preview (every session edited it) is
    prepared and its edit finds it; the edit (every session finalized it then) is not prepared."""
    from diffusionx.api import PreviewBody
    from diffusionx.engine.tiers import PredictorModel
    from diffusionx.policy.sessions import edit_likely
    from diffusionx.workflows.modes import Tiers

    assert edit_likely(None) and edit_likely(0.5) and not edit_likely(0.95)
    edge = EdgeModel(tiny_edge, 4, edit_steps=6, prepare_edits=True)
    assert edge.preparation is not None

    async def scenario():
        tiers = Tiers(edge=edge, predictor=PredictorModel())
        service = two_round_frontend(tiers, {"edge": 4})
        held: list[int] = []  # the call takes a request slot at the edge: admission control counts it
        prepare = edge.prepare_edit

        async def counted_prepare(image):
            held.append(service.admission.background_requests["edge"])
            await prepare(image)

        edge.prepare_edit = counted_prepare

        async def preview(body: PreviewBody):
            answer = await service.preview(body, "", await service.preview_needs(body))
            await asyncio.gather(*service._background)
            await edge.preparation.drain()
            return answer

        first = await preview(PreviewBody(prompt=PROMPT, seed=1, session_id="new"))
        assert edge.preparation.prepared == 1 and held == [1]
        assert service.admission.background_requests["edge"] == 0
        await preview(PreviewBody(prompt=EDITED, preview_id=first.preview_id, strength=0.5, seed=1))
        assert edge.preparation.prepared == 1  # round 2: every measured session finalized there
        assert (edge.preparation.encoded.hits, edge.preparation.encoded.misses) == (1, 0)

    asyncio.run(scenario())
