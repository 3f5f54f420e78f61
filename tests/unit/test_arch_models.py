"""sd15-arch / tiny-sd-arch: published architectures (counted on the meta device, no weights), the
49408-token CLIP tokenizer, the registry entries, and the GPU benchmark run on the CPU with tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from diffusionx.experiments import gpu_bench
from diffusionx.models.arch import (
    CLIP_VOCAB_SIZE,
    PUBLISHED_PARAMETERS,
    SD15_UNET_CONFIG,
    TINY_SD_UNET_CONFIG,
    WORDS,
    build_component,
    count_parameters,
)
from diffusionx.models.registry import REGISTRY
from diffusionx.models.tokenizer import build_vocab_and_merges, write_clip_tokenizer


@pytest.mark.parametrize("component", sorted(PUBLISHED_PARAMETERS))
def test_parameter_counts_match_the_published_checkpoints(component):
    counted = count_parameters(component)
    assert abs(counted - PUBLISHED_PARAMETERS[component]) <= 0.01 * PUBLISHED_PARAMETERS[component], counted


def test_tiny_sd_is_sd15_with_blocks_removed():
    """Same layer shapes as SD v1.5 where Tiny-SD kept a layer (BK-SDM-Tiny removes, never resizes)."""
    with torch.device("meta"):
        sd15, tiny = build_component("unet"), build_component("unet_tiny_sd")
    sd15_shapes = {tuple(p.shape) for p in sd15.parameters()}
    assert {tuple(p.shape) for p in tiny.parameters()} <= sd15_shapes
    assert tiny.mid_block is None and sd15.mid_block is not None
    assert len(tiny.down_blocks) == 3 and len(sd15.down_blocks) == 4
    assert TINY_SD_UNET_CONFIG["cross_attention_dim"] == SD15_UNET_CONFIG["cross_attention_dim"] == 768
    assert next(sd15.parameters()).device.type == "meta"  # nothing was materialised


def test_text_encoder_is_clip_vit_l14_with_the_tokenizer_ids():
    with torch.device("meta"):
        text_encoder = build_component("text_encoder")
    config = text_encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert text_encoder.get_input_embeddings().weight.shape == (CLIP_VOCAB_SIZE, 768)
    assert (config.bos_token_id, config.eos_token_id) == (CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1)
    with pytest.raises(ValueError, match="unknown component 'unet2'"):
        build_component("unet2")


def test_tokenizer_fills_clip_vocab_and_keeps_special_tokens_last(tmp_path):
    tokenizer = write_clip_tokenizer(tmp_path, WORDS, model_max_length=77, vocab_size=CLIP_VOCAB_SIZE)
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1)
    ids = tokenizer("a photo of an astronaut riding a horse", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and max(ids) < CLIP_VOCAB_SIZE
    assert tokenizer.convert_ids_to_tokens(ids[1:2]) == ["a</w>"]
    assert "astronaut</w>" in tokenizer.convert_ids_to_tokens(ids)


def test_vocab_filling_leaves_the_word_tokens_as_they_were():
    plain, plain_merges = build_vocab_and_merges(["cat", "dog"])
    filled, filled_merges = build_vocab_and_merges(["cat", "dog"], vocab_size=1000)
    assert len(filled) == 1000 and len(set(filled.values())) == 1000
    words_only = {token: i for token, i in plain.items() if not token.startswith("<|")}
    assert {token: filled[token] for token in words_only} == words_only
    assert filled_merges[: len(plain_merges)] == plain_merges
    with pytest.raises(ValueError, match="too small"):
        build_vocab_and_merges(WORDS, vocab_size=100)


def test_registry_pairs_sd15_and_tiny_sd_architectures_over_one_directory():
    cloud, edge = REGISTRY["sd15-arch"], REGISTRY["tiny-sd-arch"]
    assert cloud.family == edge.family == "sd15-arch"
    assert (cloud.tier, cloud.unet_subfolder) == ("cloud", "unet")
    assert (edge.tier, edge.unet_subfolder) == ("edge", "unet_tiny_sd")
    assert cloud.default_size == edge.default_size == 512


def test_gpu_bench_runs_on_the_cpu_with_tiny_models(tmp_path, capsys):
    """The GPU benchmark's whole path, on tiny-random at 32x32 (fp32, CPU), so it cannot rot."""
    argv = ["--tiny", "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    argv += ["--refine-steps", "10"]
    assert gpu_bench.main(argv) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["setup"]["device"].startswith("CPU") and report["setup"]["dtype"] == "float32"
    for role, model in (("edge", "tiny-random-edge"), ("cloud", "tiny-random")):
        entry = report["models"][role]
        assert entry["model"] == model
        assert [row["batch_size"] for row in entry["rows"]] == [1, 2]
        for row in entry["rows"]:
            assert row["step"]["seconds_per_step"] > 0 and row["requests"]["images_per_s"] > 0
            assert row["step"]["peak_memory_mib"] is None  # GPU memory: only on CUDA
    batching = report["step_batching"]
    assert batching["batch_size"] == 2 and batching["mixed_strengths"] == [0.3, 0.7]
    # 10 steps: strengths 0.3 / 0.7 run 3 / 7 steps; uniform 0.5 runs 5
    assert batching["uniform_bucketed"]["unet_calls"] == batching["uniform_step_batched"]["unet_calls"] == 5
    assert batching["mixed_bucketed"]["unet_calls"] == 3 + 7  # one batch per strength, one after the other
    assert batching["mixed_step_batched"]["unet_calls"] == 7  # both share the first 3 steps
    # the report is a GPU profile for GPU-timed models, load times included
    from diffusionx.models.gpu_timed import load_profile

    profile = load_profile(tmp_path / "gpu_bench.json")
    assert profile.role("cloud").batch_sizes == (1, 2) and profile.role("cloud").load_s > 0
    assert report["models"]["edge"]["load_s"] >= 0
    markdown = (tmp_path / "gpu_bench.md").read_text()
    assert "| edge | `tiny-random-edge` | 2 |" in markdown and "| mixed | step-batched |" in markdown


def test_gpu_bench_refuses_cuda_where_there_is_none(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        gpu_bench.parse_args([])
    assert "no CUDA device here" in capsys.readouterr().err
