"""The speculation flow in process: preview, speculate, finalize answers hit / promoted / miss with the
pixels of a finalize without speculation; a newer preview supersedes; a TTL expires; costs are counted."""

from __future__ import annotations

import asyncio

import numpy as np

from diffusionx import imaging
from diffusionx.engine.speculation import LocalSpeculation
from diffusionx.engine.tiers import CloudModel, EdgeModel, PredictorModel
from diffusionx.policy.speculation import SpeculationPolicy, preview_digest
from diffusionx.requests import PreviewRequest
from diffusionx.workflows import modes
from diffusionx.workflows.modes import Tiers
from tests.fakes import two_round_frontend


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingPredictor:
    """The refine predictor's strength, counting its calls."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.calls = 0

    def __call__(self, prompt, image) -> float:
        self.calls += 1
        return self.strength


def make_tiers(tiny_cloud, tiny_edge, policy: SpeculationPolicy | None = None, clock=None, predictor=None):
    clock = clock or Clock()
    cloud = CloudModel(tiny_cloud, max_batch_size=2, warm_up=False, speculation_ttl_s=30.0, clock=clock)
    speculation = LocalSpeculation(cloud.speculations, policy or SpeculationPolicy(ttl_s=30.0), clock)
    tiers = Tiers(
        edge=EdgeModel(tiny_edge, 4),
        cloud=cloud,
        predictor=PredictorModel(predictor or (lambda prompt, image: 0.6)),
        cloud_load=cloud.load,
        speculation=speculation,
    )
    return tiers, cloud, speculation, clock


async def preview_of(tiers: Tiers, prompt: str, seed: int):
    result = await modes.preview(tiers, PreviewRequest(prompt, seed=seed))
    png = imaging.encode_png(result.image)
    return imaging.decode_png(png), preview_digest(png)


async def finalize(tiers: Tiers, prompt: str, image, digest: str | None, seed: int, strength=None):
    return await modes.refine(tiers, prompt, image, seed=seed, preview=digest, strength=strength)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image)


def test_a_finished_speculation_answers_the_finalize_with_the_same_pixels(tiny_cloud, tiny_edge):
    async def scenario():
        predictor = CountingPredictor(0.6)
        tiers, cloud, speculation, _clock = make_tiers(tiny_cloud, tiny_edge, predictor=predictor)
        image, digest = await preview_of(tiers, "a red circle", 3)
        key = await modes.speculate(tiers, "a red circle", image, digest, session="s", seed=3)
        assert key is not None and cloud.loop.background_work()[0] == 1
        assert cloud.loop.work().running_requests == 0 and cloud.loop.monitor.queued_steps == 0  # not load
        while cloud.loop.busy:  # think time: the idle replica runs it
            await asyncio.sleep(0.01)
        assert predictor.calls == 1  # the speculation's
        hit = await finalize(tiers, "a red circle", image, digest, 3)
        assert predictor.calls == 1  # a hit answers before anything is predicted
        assert hit.strength_predicted == 0.6 and hit.decision.expected_latency_ms is None
        off = await finalize(tiers, "a red circle", image, None, 3)
        assert (hit.speculative, off.speculative) == ("hit", "off")
        assert np.array_equal(pixels(hit.result), pixels(off.result))
        steps = int(tiny_cloud.spec.default_steps * 0.6)
        assert hit.result.unet_calls.cloud == off.result.unet_calls.cloud == steps  # what the answer cost
        assert hit.decision.route == "cloud" and hit.decision.strength == 0.6
        assert cloud.loop.monitor.speculative_unet_calls == {"used": steps, "wasted": 0}
        # claimed once: a second finalize of the same preview runs normally
        again = await finalize(tiers, "a red circle", image, digest, 3)
        assert again.speculative == "miss"
        assert speculation.registry.counts["hit"] == 1 and speculation.registry.counts["miss"] == 1

    asyncio.run(scenario())


def test_a_running_speculation_is_promoted_and_a_different_request_misses(tiny_cloud, tiny_edge):
    async def scenario():
        tiers, cloud, speculation, _clock = make_tiers(tiny_cloud, tiny_edge)
        image, digest = await preview_of(tiers, "a blue square", 5)
        await modes.speculate(tiers, "a blue square", image, digest, session="s", seed=5)
        promoted = await finalize(tiers, "a blue square", image, digest, 5)  # before it could finish
        off = await finalize(tiers, "a blue square", image, None, 5)
        assert promoted.speculative == "promoted"
        assert np.array_equal(pixels(promoted.result), pixels(off.result))
        await modes.speculate(tiers, "a blue square", image, digest, session="s", seed=5)
        other_seed = await finalize(tiers, "a blue square", image, digest, 6)
        assert other_seed.speculative == "miss"
        assert speculation.registry.counts["promoted"] == 1
        # a finalize at another strength is another refinement: it misses, and the speculation stays
        other_strength = await finalize(tiers, "a blue square", image, digest, 5, strength=0.3)
        assert other_strength.speculative == "miss" and cloud.speculations.held == 1
        same = await finalize(tiers, "a blue square", image, digest, 5, strength=0.6)
        assert same.speculative in ("hit", "promoted")
        assert np.array_equal(pixels(same.result), pixels(off.result))

    asyncio.run(scenario())


def test_a_newer_preview_supersedes_and_the_ttl_expires_counting_the_waste(tiny_cloud, tiny_edge):
    async def scenario():
        tiers, cloud, speculation, clock = make_tiers(tiny_cloud, tiny_edge)
        first, first_digest = await preview_of(tiers, "a green tree", 1)
        await modes.speculate(tiers, "a green tree", first, first_digest, session="s", seed=1)
        second, second_digest = await preview_of(tiers, "a green tree at night", 1)
        await modes.speculate(tiers, "a green tree at night", second, second_digest, session="s", seed=1)
        assert speculation.registry.counts["superseded"] == 1 and cloud.speculations.held == 1
        stale = await finalize(tiers, "a green tree", first, first_digest, 1)
        assert stale.speculative == "miss"
        clock.now += 31.0  # past the TTL
        late = await finalize(tiers, "a green tree at night", second, second_digest, 1)
        assert late.speculative == "miss" and speculation.registry.counts["expired"] == 1
        cloud.speculations.expire()
        assert cloud.speculations.held == 0 and cloud.loop.background_work() == (0, 0)
        assert cloud.loop.monitor.speculative_unet_calls["used"] == 0

    asyncio.run(scenario())


def test_the_policy_declines_when_the_tier_is_busy_or_speculation_is_off(tiny_cloud, tiny_edge):
    async def scenario():
        tiers, cloud, _speculation, _clock = make_tiers(tiny_cloud, tiny_edge, SpeculationPolicy(mode="off"))
        image, digest = await preview_of(tiers, "a cat", 2)
        assert await modes.speculate(tiers, "a cat", image, digest, session="s", seed=2) is None
        busy_policy = SpeculationPolicy(idle_floor=0.6)
        tiers, cloud, _speculation, _clock = make_tiers(tiny_cloud, tiny_edge, busy_policy)
        running = asyncio.create_task(finalize(tiers, "a dog", image, None, 9))  # 1 of 2 slots busy
        while not cloud.loop.monitor.pool:
            await asyncio.sleep(0)
        assert await modes.speculate(tiers, "a cat", image, digest, session="s", seed=2) is None
        await running
        assert await modes.speculate(tiers, "a cat", image, digest, session="s", seed=2) is not None

    asyncio.run(scenario())


def test_the_ingress_speculates_only_on_rounds_whose_sessions_finalize_there(tiny_cloud, tiny_edge):
    """Sessions of two rounds: once five have been measured, a first preview is not speculated on (every
    session edited it), its edit is."""
    from diffusionx.api import PreviewBody

    async def scenario():
        tiers, _cloud, speculation, _clock = make_tiers(tiny_cloud, tiny_edge)
        submitted: list[str] = []
        submit = speculation.submit

        async def counting_submit(key, session, request, steps):
            submitted.append(session)
            await submit(key, session, request, steps)

        speculation.submit = counting_submit  # type: ignore[method-assign]
        service = two_round_frontend(tiers, {"edge": 4, "cloud": 4})

        async def preview(body: PreviewBody):
            answer = await service.preview(body, "", await service.preview_needs(body))
            await asyncio.gather(*service._background)  # the speculation is submitted off the answer's path
            return answer

        first = await preview(PreviewBody(prompt="a cat", seed=1, session_id="new"))
        assert submitted == []  # round 1: every measured session edited it
        await preview(
            PreviewBody(
                prompt="a black cat", preview_id=first.preview_id, strength=0.5, seed=1, session_id="new"
            )
        )
        assert submitted == ["new"]  # round 2: every measured session finalized it

    asyncio.run(scenario())
