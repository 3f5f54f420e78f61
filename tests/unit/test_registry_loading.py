from __future__ import annotations

import json

import pytest
import torch

from diffusionx.models.loading import ModelNotAvailableError, load_model, load_pipeline, select_dtype
from diffusionx.models.registry import EMBEDDED_SHAPES_DIR, REGISTRY, get_spec
from diffusionx.models.tiny_random import ensure_tiny_random


def test_registry_names_the_design_models():
    for name in ("sd15", "tiny-sd", "small-sd", "bk-sdm-tiny", "tiny-random", "shapes-edge", "shapes-cloud"):
        assert name in REGISTRY
    assert REGISTRY["sd15"].source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert REGISTRY["tiny-sd"].source == "segmind/tiny-sd"
    assert REGISTRY["sd15"].family == REGISTRY["tiny-sd"].family
    assert REGISTRY["shapes-cloud"].source == REGISTRY["shapes-edge"].source == str(EMBEDDED_SHAPES_DIR)


def test_unregistered_names_are_hub_ids_or_paths():
    spec = get_spec("someone/some-model")
    assert spec.source == "someone/some-model" and spec.family == "custom"
    with pytest.raises(ValueError, match="registered name"):
        get_spec("  ")


def test_tiny_random_is_a_diffusers_directory_with_offline_tokenizer():
    root = ensure_tiny_random()
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert (root / "tokenizer" / "vocab.json").exists() and (root / "tokenizer" / "merges.txt").exists()
    assert (root / "unet_edge" / "config.json").exists()
    assert ensure_tiny_random() == root  # built once


def test_loading_by_name_and_by_path_share_components(tiny_cloud, tiny_edge):
    assert tiny_cloud.device.type == "cpu" and tiny_cloud.dtype == torch.float32
    assert tiny_edge.vae is tiny_cloud.vae and tiny_edge.text_encoder is tiny_cloud.text_encoder
    assert tiny_edge.unet is not tiny_cloud.unet
    assert sum(p.numel() for p in tiny_edge.unet.parameters()) < sum(
        p.numel() for p in tiny_cloud.unet.parameters()
    )
    by_path = load_model(str(ensure_tiny_random()), device="cpu")
    assert by_path.unet is tiny_cloud.unet  # same directory, same weights, loaded once
    tokens = tiny_cloud.tokenizer("a red circle").input_ids
    assert len(tokens) == 5  # <start> a red circle <end>: known words are single tokens


def test_share_with_reuses_text_encoder_and_vae(tiny_cloud):
    edge = load_model("tiny-random-edge", device="cpu", share_with=tiny_cloud)
    assert edge.vae is tiny_cloud.vae and edge.tokenizer is tiny_cloud.tokenizer


def test_load_pipeline_gives_a_working_diffusers_pipeline(tiny_cloud):
    pipe = load_pipeline(tiny_cloud)
    out = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_dtype_policy():
    assert select_dtype(torch.device("cuda")) == torch.float16
    assert select_dtype(torch.device("cpu")) == torch.float32
    assert select_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        select_dtype(torch.device("cpu"), "int8")


def test_missing_hub_model_gives_one_clear_error():
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("nobody/no-such-model", device="cpu")
    message = str(info.value)
    assert "nobody/no-such-model" in message
    assert "HF_HUB_OFFLINE=1" in message and "HF_HOME" in message
    assert "--local-dir" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_registered_model_names_it():
    with pytest.raises(ModelNotAvailableError, match=r"Model 'sd15' is not available.*stable-diffusion-v1-5"):
        load_model("sd15", device="cpu")


def test_missing_local_path_says_where_it_looked(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"local directory .*nothing-here.*model_index.json"):
        load_model(str(tmp_path / "nothing-here"), device="cpu")
