"""Smoke tests of the shapes training script: a 2-step run with tiny models, the export contract, resume."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffusionx.shapes import train

TINY = [
    "--num-scenes", "64",
    "--vae-steps", "2", "--vae-batch-size", "4", "--vae-channels", "8", "16", "16",
    "--batch-size", "4", "--export-every", "2",
    "--cloud-channels", "32", "64", "--edge-channels", "16", "32", "--text-hidden", "32",
    "--eval-prompts", "2", "--eval-steps", "2", "--eval-edge-steps", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    out, run_dir = root / "out", root / "run"
    train.main(["--out", str(out), "--run-dir", str(run_dir), "--steps", "2", *TINY])
    return out, run_dir


def test_export_follows_the_loading_contract(tiny_run):
    out, _ = tiny_run
    for sub in ("model_index.json", "scheduler", "tokenizer", "text_encoder", "vae", "unet", "unet_edge"):
        assert (out / sub).exists(), sub
    assert list(out.rglob("*.safetensors")) and not list(out.rglob("*.bin"))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]

    cloud = StableDiffusionPipeline.from_pretrained(out)
    edge = StableDiffusionPipeline.from_pretrained(
        out, unet=UNet2DConditionModel.from_pretrained(out, subfolder="unet_edge")
    )
    assert isinstance(cloud.scheduler, DDIMScheduler)
    assert cloud.scheduler.config.beta_schedule == "scaled_linear"
    assert cloud.vae.config.scaling_factor != 0.18215  # computed from the latents, not SD's constant
    n_cloud = sum(p.numel() for p in cloud.unet.parameters())
    n_edge = sum(p.numel() for p in edge.unet.parameters())
    assert n_edge * 3 < n_cloud
    for pipe in (cloud, edge):
        image = pipe(
            "a large red circle on the left, blue background",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        assert image.size == (32, 32)


def test_run_writes_metrics_and_resumes_from_checkpoint(tiny_run):
    out, run_dir = tiny_run
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2]
    assert 0.0 <= float(rows[0]["cloud_accuracy"]) <= 1.0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["phase"] == "unet" and state["step"] == 2

    train.main(["--out", str(out), "--run-dir", str(run_dir), "--steps", "4", *TINY])
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4  # continued from step 2, did not restart
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]


def test_warm_start_initialises_every_model_from_an_export(tiny_run, tmp_path):
    source, _ = tiny_run
    out, run_dir = tmp_path / "out", tmp_path / "run"
    argv = ["--out", str(out), "--run-dir", str(run_dir), "--steps", "0", *TINY, "--vae-steps", "0"]
    train.main([*argv, "--init-from", str(source)])
    for sub in ("unet", "unet_edge", "vae"):
        cls = AutoencoderKL if sub == "vae" else UNet2DConditionModel
        before = cls.from_pretrained(source, subfolder=sub).state_dict()
        after = cls.from_pretrained(out, subfolder=sub).state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), sub
    old = StableDiffusionPipeline.from_pretrained(source)
    new = StableDiffusionPipeline.from_pretrained(out)
    ids = [new.tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("red", "triangle", "left")]
    old_ids = [old.tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("red", "triangle", "left")]
    new_rows = new.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(new_rows, old.text_encoder.get_input_embeddings().weight[old_ids])


def test_warm_start_refuses_a_different_architecture(tiny_run, tmp_path):
    source, _ = tiny_run
    argv = ["--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--steps", "0", *TINY]
    with pytest.raises(ValueError, match="--init-from unet does not match"):
        train.main([*argv, "--cloud-channels", "32", "32", "--init-from", str(source)])


def test_time_budget_stops_training_early(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    train.main(["--out", str(out), "--run-dir", str(run_dir), "--steps", "1000", "--minutes", "1e-6", *TINY])
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["step"] < 1000
    assert (out / "unet_edge").exists()


def test_parser_defaults_match_the_config():
    args = train.build_parser().parse_args([])
    assert args.threads == 1
    assert args.steps == train.TrainConfig.steps
    assert tuple(args.cloud_channels) == train.TrainConfig.cloud_channels


def test_metrics_csv_keeps_its_header_when_columns_change(tmp_path):
    path = tmp_path / "metrics.csv"
    train.append_metrics(path, {"step": 1, "cloud_accuracy": 0.2})
    train.append_metrics(path, {"step": 2, "vae_accuracy": 0.9, "cloud_accuracy": 0.5})
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["step", "cloud_accuracy", "vae_accuracy"]
    assert rows[0]["cloud_accuracy"] == "0.2" and rows[0]["vae_accuracy"] == ""
    assert rows[1]["cloud_accuracy"] == "0.5" and rows[1]["vae_accuracy"] == "0.9"


def test_snr_weights_clamp_the_x0_weight_from_above_and_below():
    alphas_cumprod = DDIMScheduler(**train.SCHEDULER_CONFIG).alphas_cumprod
    timesteps = torch.tensor([10, 999])
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    assert snr[0] > 5 and snr[1] < 0.01
    plain = train.snr_weights(alphas_cumprod, timesteps, gamma=5.0)
    assert plain[0] == pytest.approx(5 / snr[0]) and plain[1] == pytest.approx(1.0)
    floored = train.snr_weights(alphas_cumprod, timesteps, gamma=5.0, min_x0_weight=0.5)
    assert floored[0] == pytest.approx(plain[0]) and floored[1] == pytest.approx(0.5 / snr[1])
    assert torch.equal(train.snr_weights(alphas_cumprod, timesteps, gamma=0.0), torch.ones(2))
