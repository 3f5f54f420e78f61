from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from diffusionx.policy.router import CloudLoad
from diffusionx.policy.service_model import ReplicaLoad
from diffusionx.requests import GenerationResult, InvalidRequestError, Mode, PreviewRequest, UnetCalls
from diffusionx.sampling.collaborative import CollaborationParams, expected_unet_calls
from diffusionx.sampling.generation import text_to_image
from diffusionx.workflows import modes
from diffusionx.workflows.local import generate_all, local_tiers
from diffusionx.workflows.modes import GenerateRequest, Tiers, collaboration_params


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def generate(mode, cloud, edge, requests, **tier_options):
    """The served workflow on in-process tiers; the results' GenerationResults in request order."""
    generated = generate_all(local_tiers(cloud, edge, **tier_options), mode, requests)
    return [g.result for g in generated]


def test_modes_are_the_designed_ones():
    assert [m.value for m in Mode] == ["diffusionx", "cloud", "edge", "hybrid", "ec-diff"]


def test_cloud_mode_is_text_to_image_on_the_cloud(tiny_cloud, tiny_edge):
    [result] = generate("cloud", tiny_cloud, tiny_edge, [PreviewRequest("a cat", seed=4)])
    [reference] = text_to_image(tiny_cloud, [PreviewRequest("a cat", seed=4)], "cloud")
    assert result.unet_calls.to_dict() == {
        "cloud": tiny_cloud.spec.default_steps,
        "edge": 0,
        "approximated": 0,
    }
    assert np.array_equal(pixels(result.image), pixels(reference.image))


def test_edge_mode_uses_the_edge_default_steps_not_preview_steps(tiny_edge):
    assert tiny_edge.spec.default_steps != tiny_edge.spec.preview_steps
    [result] = generate("edge", None, tiny_edge, [GenerateRequest("a cat", seed=4)])
    assert result.unet_calls.to_dict() == {
        "cloud": 0,
        "edge": tiny_edge.spec.default_steps,
        "approximated": 0,
    }
    [explicit] = generate("edge", None, tiny_edge, [GenerateRequest("a cat", seed=4, num_inference_steps=3)])
    assert explicit.unet_calls.edge == 3


def test_hybrid_and_ec_diff_counts(tiny_cloud, tiny_edge):
    [hybrid] = generate("hybrid", tiny_cloud, tiny_edge, [GenerateRequest("a cat", num_inference_steps=8)])
    assert hybrid.unet_calls.to_dict() == {"cloud": 6, "edge": 2, "approximated": 0}  # s = round(0.74 * 8)
    [switched] = generate(
        "hybrid", tiny_cloud, tiny_edge, [GenerateRequest("a cat", num_inference_steps=8, switch_step=2)]
    )
    assert switched.unet_calls.to_dict() == {"cloud": 2, "edge": 6, "approximated": 0}
    [ec] = generate("ec-diff", tiny_cloud, tiny_edge, [GenerateRequest("a cat", num_inference_steps=8)])
    assert ec.unet_calls == expected_unet_calls(CollaborationParams.ec_diff(8))
    assert ec.unet_calls.to_dict() == {"cloud": 3, "edge": 2, "approximated": 3}


def test_ec_diff_request_fields_reach_the_sampler(tiny_cloud):
    request = GenerateRequest(
        "a cat", num_inference_steps=50, switch_step=40, warmup_steps=5, approx_interval=3, smoothing=0.5
    )
    params = collaboration_params("ec-diff", request, tiny_cloud.spec.default_steps)
    assert params == CollaborationParams(50, 40, 5, 3, 0.5)
    default = collaboration_params("ec-diff", GenerateRequest("a cat"), tiny_cloud.spec.default_steps)
    assert default.num_inference_steps == tiny_cloud.spec.default_steps


def test_diffusionx_mode_previews_then_refines_without_asking_the_predictor_for_given_strengths(
    tiny_cloud, tiny_edge
):
    asked = []

    def predict(prompt, image):
        asked.append(prompt)
        return 0.25

    requests = [
        GenerateRequest("a cat", seed=1, strength=0.5),
        GenerateRequest("a dog", seed=2, strength=1.0),
        GenerateRequest("a cow", seed=3),
    ]
    results = generate("diffusionx", tiny_cloud, tiny_edge, requests, predict=predict)
    assert asked == ["a cow"]  # only the request without a strength was predicted
    preview_steps, cloud_steps = tiny_edge.spec.preview_steps, tiny_cloud.spec.default_steps
    assert results[0].unet_calls.to_dict() == {
        "cloud": cloud_steps // 2,
        "edge": preview_steps,
        "approximated": 0,
    }
    assert results[0].strength == 0.5
    assert results[1].unet_calls.cloud == cloud_steps and results[1].strength == 1.0
    assert results[2].unet_calls.cloud == int(cloud_steps * 0.25) and results[2].strength == 0.25
    assert {"preview_unet", "unet", "queue"} <= set(results[0].timings_ms)
    assert "predict" in results[2].timings_ms and "predict" not in results[0].timings_ms


def test_diffusionx_refuses_a_predicted_strength_out_of_range(tiny_cloud, tiny_edge):
    with pytest.raises(InvalidRequestError, match=r"predicted strength=1\.5"):
        generate("diffusionx", tiny_cloud, tiny_edge, [GenerateRequest("a cat")], predict=lambda p, i: 1.5)


@pytest.mark.parametrize(
    ("mode", "request_kwargs", "message"),
    [
        (
            "cloud",
            {"strength": 0.5},
            "strength does not apply to mode 'cloud': it is a parameter of diffusionx",
        ),
        ("hybrid", {"warmup_steps": 3}, "warmup_steps does not apply to mode 'hybrid'"),
        ("edge", {"switch_step": 3}, "switch_step does not apply to mode 'edge'"),
        ("ec-diff", {"num_inference_steps": 10, "warmup_steps": 9, "switch_step": 5}, "warmup_steps=9"),
        ("hybrid", {"num_inference_steps": 10, "switch_step": 11}, "switch_step=11"),
    ],
)
def test_bad_mode_parameters_are_refused(tiny_cloud, tiny_edge, mode, request_kwargs, message):
    with pytest.raises(InvalidRequestError) as error:
        generate(mode, tiny_cloud, tiny_edge, [GenerateRequest("a cat", **request_kwargs)])
    assert message in str(error.value)


def test_unknown_mode_and_missing_model():
    with pytest.raises(InvalidRequestError, match="use one of diffusionx, cloud, edge, hybrid, ec-diff"):
        generate("fast", None, None, [PreviewRequest("a cat")])
    with pytest.raises(ValueError, match="needs the cloud tier"):
        generate("cloud", None, None, [PreviewRequest("a cat")])
    with pytest.raises(InvalidRequestError, match="strength=2"):
        GenerateRequest("a cat", strength=2)


class FakeTiers:
    """Tiers without models, counting calls: what the workflows ask of each tier."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def info(self) -> dict:
        self.calls.append("info")
        return {"default_steps": 8, "preview_steps": 2}

    async def plan(self, request):
        self.calls.append("plan")
        return "planned"

    async def finish(self, state):
        # the cloud's plan arrives unresolved (an awaitable), so Serve can pass it replica to replica
        self.calls.append(f"finish({type(state).__name__})")
        assert await state == "planned"
        return GenerationResult(Image.new("RGB", (8, 8)), 0, UnetCalls(cloud=6, edge=2), 8)


def test_tier_info_is_fetched_once_and_the_plan_goes_to_the_edge_unresolved():
    import asyncio

    fake = FakeTiers()
    tiers = Tiers(edge=fake, cloud=fake)

    async def run():
        for _ in range(3):
            await modes.generate(tiers, "hybrid", GenerateRequest("a cat"))

    asyncio.run(run())
    assert fake.calls.count("info") == 1
    assert fake.calls.count("finish(coroutine)") == 3 and fake.calls.count("plan") == 3


def test_an_edge_fallback_refines_on_the_edges_own_schedule(tiny_cloud, tiny_edge):
    """A finalize the cloud cannot serve in time falls back to the edge with the edge's edit steps, not
    the cloud's (the response reports the steps that ran)."""
    busy = ReplicaLoad(pool=((1, 1000),), queued=(), max_batch_size=1, step_time_s=(0.05, 0.0))

    async def loaded() -> CloudLoad:
        return CloudLoad((busy,))

    tiers = local_tiers(tiny_cloud, tiny_edge)
    tiers.cloud_load = loaded
    image = Image.new("RGB", (32, 32), (200, 30, 30))

    async def run() -> modes.Refined:
        return await modes.refine(
            tiers, "a cat", image, strength=1.0, num_inference_steps=12, latency_target_ms=100
        )

    final = asyncio.run(run())
    edge_steps = tiny_edge.spec.default_steps
    assert final.decision.route == "edge-fallback" and edge_steps != 12
    assert final.decision.num_inference_steps == edge_steps
    assert final.result.unet_calls.edge == edge_steps and final.result.unet_calls.cloud == 0


def test_a_refinement_carries_its_owner_and_weight_to_the_cloud_tier():
    """The step batcher shares slots by owner: the request it gets must name whose it is."""

    class RecordingCloud(FakeTiers):
        async def refine(self, request, on_progress=None):
            self.calls.append(f"refine({request.owner},{request.owner_weight})")
            return GenerationResult(request.image, request.seed, UnetCalls(cloud=4), 8)

    cloud = RecordingCloud()
    tiers = Tiers(cloud=cloud)
    image = Image.new("RGB", (8, 8))
    asyncio.run(modes.refine(tiers, "a cat", image, strength=0.5, owner="key-a", owner_weight=2.0))
    assert "refine(key-a,2.0)" in cloud.calls
