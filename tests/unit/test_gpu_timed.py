"""GPU-timed models: t(b) from a gpu-bench profile, a UNet call that lasts t(b), the registry entries."""

from __future__ import annotations

import json

import pytest
import torch

from diffusionx.models.gpu_timed import (
    DEFAULT_PROFILE,
    GpuTimedUNet,
    StepTimes,
    load_profile,
    parse_profile,
)
from diffusionx.models.registry import get_spec


def report(rows: list[tuple[int, float | None]], load_s: float | None = 3.0) -> dict:
    cells = [
        {"batch_size": b, "step": {"oom": True} if t is None else {"seconds_per_step": t}} for b, t in rows
    ]
    model = {"model": "sd15", "rows": cells, **({} if load_s is None else {"load_s": load_s})}
    return {"benchmark": "gpu", "setup": {"device": "Test GPU"}, "models": {"cloud": model}}


def test_t_of_b_is_linear_between_measured_sizes_and_extends_the_last_segment():
    times = StepTimes((1, 4, 16), (0.04, 0.10, 0.34))
    assert times.step_s(1) == pytest.approx(0.04)
    assert times.step_s(2) == pytest.approx(0.06)
    assert times.step_s(8) == pytest.approx(0.18)
    assert times.step_s(20) == pytest.approx(0.42)  # past 16: the 4..16 slope, 0.02 s per sample
    assert StepTimes((2,), (0.1,)).step_s(4) == pytest.approx(0.2)  # one row: proportional


def test_a_gpu_bench_report_is_a_profile_and_oom_rows_are_skipped():
    profile = parse_profile(report([(1, 0.05), (8, 0.2), (16, None)], load_s=None), "x.json")
    cloud = profile.role("cloud")
    assert cloud.batch_sizes == (1, 8) and cloud.load_s == 0.0 and profile.device == "Test GPU"
    with pytest.raises(ValueError, match="no 'edge' model"):
        profile.role("edge")
    with pytest.raises(ValueError, match="not a gpu-bench report"):
        parse_profile({"models": {}})


def test_the_shipped_profile_states_its_source_and_is_the_default(tmp_path, monkeypatch):
    shipped = json.loads(DEFAULT_PROFILE.read_text())
    assert shipped["source"]["measured_here"] is False and "diffusers" in shipped["source"]["cloud"]
    profile = load_profile()
    assert profile.role("cloud").step_s(1) > profile.role("edge").step_s(1) > 0
    path = tmp_path / "gpu_bench.json"
    path.write_text(json.dumps(report([(1, 0.5)])))
    monkeypatch.setenv("DIFFUSIONX_GPU_PROFILE", str(path))
    assert load_profile().role("cloud").step_s(1) == pytest.approx(0.5)


class Standin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, sample, timestep, encoder_hidden_states=None):
        self.calls.append(sample.shape[0])
        return sample * 0


def test_a_call_waits_t_of_the_guided_batch_less_what_the_standin_took():
    waits: list[float] = []
    unet = GpuTimedUNet(Standin(), StepTimes((1, 4), (1.0, 2.5)), rows_per_sample=2)
    unet.sleep = waits.append
    out = unet(torch.ones(8, 4, 4, 4), 10, encoder_hidden_states=None)  # 8 rows = batch 4 under CFG
    assert out.shape == (8, 4, 4, 4) and unet.standin.calls == [8]
    assert len(waits) == 1 and 2.4 < waits[0] <= 2.5
    unet.times = StepTimes((1,), (1e-9,))  # a step faster than the stand-in: no wait, an overrun
    unet(torch.ones(2, 4, 4, 4), 10)
    assert len(waits) == 1 and unet.overruns == 1


def test_registry_entries_time_the_shapes_standin_as_sd15_and_tiny_sd():
    cloud, edge = get_spec("sd15-gpu-timed"), get_spec("tiny-sd-gpu-timed")
    assert (cloud.gpu_timed, edge.gpu_timed) == ("cloud", "edge")
    assert cloud.family == edge.family == "shapes"  # one VAE and text encoder: refine and EC-Diff work


def test_loading_a_gpu_timed_model_waits_the_load_time_and_wraps_the_unet(tmp_path, monkeypatch):
    from diffusionx.models import loading

    path = tmp_path / "gpu_bench.json"
    path.write_text(json.dumps(report([(1, 0.01)], load_s=7.0)))
    monkeypatch.setenv("DIFFUSIONX_GPU_PROFILE", str(path))
    waited: list[float] = []
    monkeypatch.setattr(loading.time, "sleep", waited.append)
    model = loading.load_model("sd15-gpu-timed", device="cpu")
    assert isinstance(model.unet, GpuTimedUNet) and waited == [7.0]
    assert model.unet.config.in_channels == model.latent_channels == 4


def test_the_loaded_standin_is_zero_noise_shaped_like_the_sample(monkeypatch):
    from diffusionx.models import loading
    from diffusionx.models.gpu_timed import ZeroNoise

    monkeypatch.setattr(loading.time, "sleep", lambda _s: None)
    model = loading.load_model("tiny-sd-gpu-timed", device="cpu")
    assert isinstance(model.unet.standin, ZeroNoise)
    waits: list[float] = []
    model.unet.sleep = waits.append
    latents = torch.randn(4, 4, 8, 8)  # 2 samples under guidance
    context = torch.zeros(4, 77, model.unet.config.cross_attention_dim)
    out = model.unet(latents, 10, encoder_hidden_states=context)
    assert out.sample.shape == latents.shape and not out.sample.any()
    assert len(waits) == 1 and waits[0] > 0  # t(2) of the shipped profile, padded
