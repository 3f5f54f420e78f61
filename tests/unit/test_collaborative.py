from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image

from diffusionx.requests import InvalidRequestError, PreviewRequest
from diffusionx.sampling.collaborative import (
    CollaborationParams,
    CollaborativeRequest,
    IncompatibleModelsError,
    PlanState,
    check_pair,
    cloud_phase,
    edge_phase,
    expected_unet_calls,
    generate_collaborative,
    plan_steps,
)
from diffusionx.sampling.generation import text_to_image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def count_forward(monkeypatch: pytest.MonkeyPatch, unet: torch.nn.Module) -> list[torch.Tensor]:
    """Records the output of every real UNet evaluation."""
    outputs: list[torch.Tensor] = []
    original = unet.forward

    def counted(*args, **kwargs):
        output = original(*args, **kwargs)
        outputs.append(output.sample.clone())
        return output

    monkeypatch.setattr(unet, "forward", counted)
    return outputs


def tiny_unet(cross_attention_dim: int = 32, channels: int = 4) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=2,
    ).eval()


# --- the plan -----------------------------------------------------------------------------------------


def test_reference_plan_ddim50():
    params = CollaborationParams(50, switch_step=37, warmup_steps=7, approx_interval=2, smoothing=0.3)
    roles = plan_steps(params)
    cloud_steps = [i for i, role in enumerate(roles) if role == "cloud"]
    assert cloud_steps == [0, 1, 2, 3, 4, 5, 6, *range(9, 37, 3)]
    assert roles[37:] == ["edge"] * 13
    assert expected_unet_calls(params).to_dict() == {"cloud": 17, "edge": 13, "approximated": 20}
    assert CollaborationParams() == params  # the defaults are the reference


def test_ec_diff_defaults_scale_with_steps():
    assert CollaborationParams.ec_diff(50) == CollaborationParams()
    scaled = CollaborationParams.ec_diff(20)
    assert (scaled.warmup_steps, scaled.approx_interval, scaled.smoothing, scaled.switch_step) == (
        3,
        2,
        0.3,
        15,
    )
    assert CollaborationParams.ec_diff(1).warmup_steps is None  # nothing to extrapolate
    assert CollaborationParams.ec_diff(20, switch_step=10, warmup_steps=4).warmup_steps == 4
    hybrid = CollaborationParams.hybrid(20)
    assert (hybrid.warmup_steps, hybrid.switch_step) == (None, 15)
    assert expected_unet_calls(hybrid).to_dict() == {"cloud": 15, "edge": 5, "approximated": 0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"switch_step": 51},
            "switch_step=51 is not allowed: use an integer from 0 to num_inference_steps (50)",
        ),
        ({"switch_step": -1}, "switch_step=-1"),
        ({"warmup_steps": 1}, "warmup_steps=1 is not allowed"),
        ({"warmup_steps": 40}, "to switch_step (37)"),
        ({"approx_interval": -1}, "approx_interval=-1 is not allowed: use an integer >= 0"),
        ({"smoothing": 1.5}, "smoothing=1.5 is not allowed: use a number from 0.0 to 1.0"),
        ({"num_inference_steps": 0}, "num_inference_steps=0"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0"),
    ],
)
def test_params_refuse_bad_values(kwargs, message):
    with pytest.raises(InvalidRequestError) as error:
        CollaborationParams(**kwargs)
    assert message in str(error.value)


# --- the sampler --------------------------------------------------------------------------------------


def test_ddim50_reference_counts_real_unet_calls(tiny_cloud, tiny_edge, monkeypatch):
    cloud_outputs = count_forward(monkeypatch, tiny_cloud.unet)
    edge_outputs = count_forward(monkeypatch, tiny_edge.unet)
    params = CollaborationParams(50, switch_step=37, warmup_steps=7, approx_interval=2, smoothing=0.3)
    [result] = generate_collaborative(
        tiny_cloud, tiny_edge, [CollaborativeRequest("a red circle", 1, params=params)]
    )
    assert (len(cloud_outputs), len(edge_outputs)) == (17, 13)
    assert result.unet_calls.to_dict() == {"cloud": 17, "edge": 13, "approximated": 20}
    assert result.num_inference_steps == 50
    assert result.image.size == (32, 32)


def test_approximated_steps_extrapolate_the_noise(tiny_cloud, tiny_edge, monkeypatch):
    """eps_i fed to DDIM follows the rules: cloud output, eps_{i-1} + g, or edge output."""
    cloud_outputs = count_forward(monkeypatch, tiny_cloud.unet)
    edge_outputs = count_forward(monkeypatch, tiny_edge.unet)
    used: list[torch.Tensor] = []
    original_step = DDIMScheduler.step

    def recording_step(self, model_output, *args, **kwargs):
        used.append(model_output.clone())
        return original_step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", recording_step)
    # guidance 1: eps is the UNet output itself, so the recorded outputs are comparable one to one
    p, k, a, s = 3, 2, 0.25, 10
    params = CollaborationParams(12, s, p, k, a, guidance_scale=1.0)
    generate_collaborative(tiny_cloud, tiny_edge, [CollaborativeRequest("a blue square", 5, params=params)])
    assert plan_steps(params) == ["cloud"] * 3 + ["approximated"] * 2 + ["cloud"] + ["approximated"] * 2 + [
        "cloud",
        "approximated",
        "edge",
        "edge",
    ]
    cloud_iter, edge_iter = iter(cloud_outputs), iter(edge_outputs)
    gradient = None
    for i, role in enumerate(plan_steps(params)):
        if role == "cloud":
            assert torch.equal(used[i], next(cloud_iter))
            if i == p - 1:
                gradient = used[i] - used[i - 1]
            elif i >= p:
                gradient = a * (used[i] - used[i - 1])
        elif role == "approximated":
            assert torch.allclose(used[i], used[i - 1] + gradient, atol=1e-6)
        else:
            assert torch.equal(used[i], next(edge_iter))
    assert len(used) == 12


def test_no_approximation_switch_at_end_equals_cloud_only(tiny_cloud, tiny_edge):
    params = CollaborationParams.hybrid(6, switch_step=6, guidance_scale=2.0)
    prompts = [("a red circle", 3), ("a dog on the left", 8)]
    collaborative = generate_collaborative(
        tiny_cloud, tiny_edge, [CollaborativeRequest(t, seed, params=params) for t, seed in prompts]
    )
    cloud_only = text_to_image(
        tiny_cloud,
        [PreviewRequest(t, seed, num_inference_steps=6, guidance_scale=2.0) for t, seed in prompts],
        "cloud",
    )
    for mine, reference in zip(collaborative, cloud_only, strict=True):
        assert np.array_equal(pixels(mine.image), pixels(reference.image))
        assert mine.unet_calls == reference.unet_calls


def test_hybrid_switch_zero_equals_edge_only(tiny_cloud, tiny_edge, monkeypatch):
    cloud_outputs = count_forward(monkeypatch, tiny_cloud.unet)
    params = CollaborationParams.hybrid(5, switch_step=0, guidance_scale=2.0)
    [mine] = generate_collaborative(tiny_cloud, tiny_edge, [CollaborativeRequest("a cat", 11, params=params)])
    [reference] = text_to_image(tiny_edge, [PreviewRequest("a cat", 11, num_inference_steps=5)], "edge")
    assert np.array_equal(pixels(mine.image), pixels(reference.image))
    assert mine.unet_calls.to_dict() == {"cloud": 0, "edge": 5, "approximated": 0}
    assert cloud_outputs == []


def test_hybrid_differs_from_both_baselines(tiny_cloud, tiny_edge):
    hybrid = CollaborationParams.hybrid(6, switch_step=3)
    ec_diff = CollaborationParams(6, switch_step=5, warmup_steps=2, approx_interval=1, smoothing=0.5)
    requests = [
        CollaborativeRequest("a cat", 2, params=hybrid),
        CollaborativeRequest("a cat", 2, params=ec_diff),
    ]
    [h, e] = generate_collaborative(tiny_cloud, tiny_edge, requests)
    [c] = text_to_image(tiny_cloud, [PreviewRequest("a cat", 2, num_inference_steps=6)], "cloud")
    assert h.unet_calls.to_dict() == {"cloud": 3, "edge": 3, "approximated": 0}
    assert e.unet_calls.to_dict() == {"cloud": 3, "edge": 1, "approximated": 2}
    assert not np.array_equal(pixels(h.image), pixels(c.image))
    assert not np.array_equal(pixels(h.image), pixels(e.image))


def test_split_phases_equal_one_call_and_cross_processes(tiny_cloud, tiny_edge):
    params = CollaborationParams.ec_diff(8)
    requests = [
        CollaborativeRequest(text, seed, params=params) for text, seed in (("a cat", 1), ("a dog", 2))
    ]
    states = cloud_phase(tiny_cloud, requests)
    assert all(isinstance(state, PlanState) for state in states)
    assert states[0].step_index == params.switch_step
    assert states[0].latents.shape == (4, 16, 16) and states[0].latents.dtype == np.float32
    assert states[0].unet_calls.to_dict() == {"cloud": 3, "edge": 0, "approximated": 3}
    shipped = pickle.loads(pickle.dumps(states))  # what a Ray object-store hop does
    # the edge tier batches states from separate cloud batches
    split = edge_phase(tiny_edge, [shipped[1], shipped[0]])
    one_call = generate_collaborative(tiny_cloud, tiny_edge, requests)
    assert split[0].batch_size == 2
    assert np.array_equal(pixels(split[0].image), pixels(one_call[1].image))
    assert np.array_equal(pixels(split[1].image), pixels(one_call[0].image))
    assert split[1].unet_calls.to_dict() == {"cloud": 3, "edge": 2, "approximated": 3}
    assert {"cloud_unet", "edge_unet", "vae", "model_total"} <= set(split[0].timings_ms)


def test_batches_are_deterministic_and_grouped_by_params(tiny_cloud, tiny_edge):
    short = CollaborationParams.ec_diff(6)
    long = CollaborationParams.hybrid(8, switch_step=4)
    target = CollaborativeRequest("a blue square", 42, params=short)
    mixed = [
        CollaborativeRequest("a cat", 1, params=short),
        CollaborativeRequest("a house", 3, params=long),
        target,
    ]
    [alone] = generate_collaborative(tiny_cloud, tiny_edge, [target])
    first = generate_collaborative(tiny_cloud, tiny_edge, mixed)
    again = generate_collaborative(tiny_cloud, tiny_edge, mixed)
    assert [r.batch_size for r in first] == [2, 1, 2]
    assert [r.unet_calls for r in first] == [expected_unet_calls(p) for p in (short, long, short)]
    assert np.array_equal(pixels(alone.image), pixels(first[2].image))
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(pixels(a.image), pixels(b.image))
    [other_seed] = generate_collaborative(tiny_cloud, tiny_edge, [dataclasses.replace(target, seed=43)])
    assert not np.array_equal(pixels(alone.image), pixels(other_seed.image))


# --- refusing a pair that cannot collaborate ----------------------------------------------------------


def test_pair_with_other_text_width_is_refused(tiny_cloud, tiny_edge):
    wide = dataclasses.replace(tiny_edge, unet=tiny_unet(cross_attention_dim=16))
    with pytest.raises(IncompatibleModelsError, match="read 32- and 16-dim text embeddings"):
        check_pair(tiny_cloud, wide)
    with pytest.raises(IncompatibleModelsError, match="16-dim"):
        generate_collaborative(
            tiny_cloud, wide, [CollaborativeRequest("a cat", params=CollaborationParams.ec_diff(4))]
        )
    states = cloud_phase(tiny_cloud, [CollaborativeRequest("a cat", params=CollaborationParams.ec_diff(4))])
    with pytest.raises(IncompatibleModelsError, match="32-dim text embeddings, the edge UNet 16-dim"):
        edge_phase(wide, states)


def test_pair_with_other_latent_channels_is_refused(tiny_cloud, tiny_edge):
    three = dataclasses.replace(tiny_edge, unet=tiny_unet(channels=3))
    with pytest.raises(IncompatibleModelsError, match="take 4 and 3 latent channels"):
        check_pair(tiny_cloud, three)
    states = cloud_phase(tiny_cloud, [CollaborativeRequest("a cat", params=CollaborationParams.ec_diff(4))])
    with pytest.raises(IncompatibleModelsError, match="4 latent channels, the edge UNet takes 3"):
        edge_phase(three, states)


def test_pair_not_sharing_vae_and_text_encoder_is_refused(tiny_cloud, tiny_edge):
    import copy

    own_encoder = dataclasses.replace(tiny_edge, text_encoder=copy.deepcopy(tiny_edge.text_encoder))
    with pytest.raises(IncompatibleModelsError, match="same model family"):
        check_pair(tiny_cloud, own_encoder)
    states = cloud_phase(tiny_cloud, [CollaborativeRequest("a cat", params=CollaborationParams.ec_diff(4))])
    other_family = dataclasses.replace(tiny_edge, spec=dataclasses.replace(tiny_edge.spec, family="sd15"))
    with pytest.raises(IncompatibleModelsError, match="same model family"):
        edge_phase(other_family, states)


def test_request_validation(tiny_cloud):
    with pytest.raises(InvalidRequestError, match="width=30"):
        CollaborativeRequest("a cat", width=30)
    with pytest.raises(InvalidRequestError, match="params must be CollaborationParams"):
        CollaborativeRequest("a cat", params={"switch_step": 3})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="prompt"):
        CollaborativeRequest("  ")
