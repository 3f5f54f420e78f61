"""Train the embedded shapes text-to-image models on CPU and save them in diffusers format.

Two phases, one process, resumable from `<run-dir>/checkpoint.pt`:
1. VAE: a small AutoencoderKL (32x32x3 -> 8x8x4) on rendered scenes, MSE + a small KL term (from scratch,
   or fine-tuning the `--init-from` export's VAE). Then every
   training scene is encoded once (posterior mean and std are cached) and `scaling_factor` = 1 / std of
   the latents is written into the VAE config.
2. Diffusion: the cloud UNet and the much smaller edge UNet are trained in the same loop on the same
   latents, noise and timesteps (DDPM epsilon prediction, SD's scaled_linear betas, min-SNR-5 weighting,
   optionally with a floor on the x0 weight of the high-noise steps, `--min-x0-weight`).
   The tiny CLIP text encoder is trained by the cloud loss only; the edge UNet sees detached text
   embeddings. Captions are dropped to the empty prompt with probability `--drop-caption` so that
   classifier-free guidance works. EMA copies of the weights are what gets exported.

Every `--export-every` steps the EMA pipeline is exported to `--out` (so something usable exists early) and
scored by the judge on held-out prompts (accuracy, per attribute, exact match); the figures go to
`<run-dir>/metrics.csv`. Rerunning the same command resumes from the checkpoint.

    diffusionx train-shapes --run-dir runs/shapes-v2 --out runs/shapes-v2/export
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusionx.models.tokenizer import write_clip_tokenizer
from diffusionx.shapes import data, judge, sample

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass
class TrainConfig:
    out: str = "runs/shapes-v2/export"  # final (and intermediate) diffusers export; copy it to
    # diffusionx/models/shapes only once its figures are checked, so the shipped weights stay intact
    run_dir: str = "runs/shapes-v2"  # checkpoints, metrics.csv, config.json
    # Warm start: a diffusers export (e.g. diffusionx/models/shapes) whose VAE, UNets and text encoder
    # initialise this run (same architecture); token embeddings are remapped onto the new tokenizer. The VAE
    # phase then fine-tunes the export's VAE for --vae-steps (0 keeps it, and so the UNets' latent space).
    init_from: str = ""
    seed: int = 0  # seeds data, initialisation, noise, batches
    threads: int = 1  # torch threads; 1 keeps the machine's other core free
    num_scenes: int = 60000  # training scenes rendered once and cached as latents
    model_max_length: int = 24  # tokens; the longest caption is 20 (one token per word, BOS, EOS)
    # Share of two-shape training scenes. Held-out prompts keep data.TWO_SHAPE_PROBABILITY (0.4); v1 trained
    # on 0.4 and never learned which shape a place phrase belongs to (two-shape position 0.49 = chance).
    two_shape_probability: float = 0.7
    # VAE phase
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 blocks -> 2 downsamples -> 8x8 latents
    # Diffusion phase
    steps: int = 8000
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    # Decoder fine-tuning during the diffusion phase (encoder frozen, so the latents do not move), as SD's
    # ft-MSE decoder: one decoder step every `decoder_every` diffusion steps (0 disables).
    decoder_every: int = 4
    decoder_lr: float = 2e-4
    drop_caption: float = 0.1  # probability of training on the empty prompt (for CFG)
    min_snr_gamma: float = 5.0  # 0 disables min-SNR loss weighting
    # Lower bound of the loss weight in x0 terms (0 = plain min-SNR). An epsilon loss weighs x0 errors by
    # SNR, which is ~0.005-0.1 at t >= 700: exactly the steps where the layout, and which shape goes to
    # which place, is decided (later the noisy latent shows it). v1 never learned that binding.
    min_x0_weight: float = 0.0
    text_hidden: int = 64
    text_layers: int = 2
    cloud_channels: tuple[int, ...] = (64, 128)
    cloud_layers_per_block: int = 1
    edge_channels: tuple[int, ...] = (32, 64)
    # Exports / evaluation / checkpoints
    export_every: int = 1000  # diffusion steps between EMA exports + judge evaluation
    eval_prompts: int = 128  # the held-out set the quality targets are defined on
    eval_steps: int = 20  # cloud DDIM steps at evaluation
    eval_edge_steps: int = 8  # edge preview DDIM steps at evaluation
    eval_guidance: float = 4.0
    checkpoint_every_min: float = 5.0
    # Wall-clock caps (0 = none). The step counts are the reproducible length; on a busy machine these stop
    # a phase early (the log and metrics.csv record the step reached). Time spent is kept across resumes.
    vae_minutes: float = 0.0
    minutes: float = 0.0  # diffusion phase, including the periodic exports/evaluations


# --- model factories --------------------------------------------------------------------------------------


def make_vae(config: TrainConfig) -> AutoencoderKL:
    channels = tuple(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(channels[0], 16),
        sample_size=32,
    )


def make_text_encoder(config: TrainConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=4 * config.text_hidden,
            projection_dim=config.text_hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=config.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def make_unet(channels: tuple[int, ...], layers_per_block: int, cross_attention_dim: int, edge: bool):
    """Cloud: cross-attention at both latent resolutions (8x8, 4x4). Edge: only at 8x8 in, out and mid."""
    channels = tuple(channels)
    n = len(channels)
    if edge:
        down = ("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (n - 1)
        up = ("UpBlock2D",) * (n - 1) + ("CrossAttnUpBlock2D",)
    else:
        down = ("CrossAttnDownBlock2D",) * n
        up = ("CrossAttnUpBlock2D",) * n
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4 if not edge else 2,  # diffusers: number of heads
        norm_num_groups=min(channels[0], 32),
    )


def load_weights(model: torch.nn.Module, source: torch.nn.Module, name: str) -> None:
    """Copies `source`'s weights into `model`; the configs must describe the same architecture."""
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as error:
        raise ValueError(f"--init-from {name} does not match this run's {name} config: {error}") from None


@torch.no_grad()
def warm_start(root: str, tokenizer: CLIPTokenizer, models: dict[str, torch.nn.Module]) -> None:
    """Initialises the text encoder and both UNets from the export at `root`.

    The export's tokenizer may split words differently, so each token embedding of the new tokenizer is
    the mean of the old embeddings of the same text (identical for words that were already one token);
    position embeddings are copied for the positions both have."""
    load_weights(models["unet"], UNet2DConditionModel.from_pretrained(root, subfolder="unet"), "unet")
    edge = UNet2DConditionModel.from_pretrained(root, subfolder="unet_edge")
    load_weights(models["unet_edge"], edge, "unet_edge")
    old_tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    old = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    new: CLIPTextModel = models["text_encoder"]
    skip = ("token_embedding.weight", "position_embedding.weight")  # sizes follow the tokenizer
    old_state = {k: v for k, v in old.state_dict().items() if not k.endswith(skip)}
    missing, unexpected = new.load_state_dict(old_state, strict=False)
    if unexpected or [k for k in missing if not k.endswith(skip)]:
        raise ValueError(f"--init-from text_encoder does not match: missing {missing}, extra {unexpected}")
    old_tokens = old.get_input_embeddings().weight
    new_tokens = new.get_input_embeddings().weight
    for token, index in tokenizer.get_vocab().items():
        if token in (tokenizer.bos_token, tokenizer.eos_token):
            new_tokens[index] = old_tokens[old_tokenizer.convert_tokens_to_ids(token)]
            continue
        old_ids = old_tokenizer(token.replace("</w>", " "), add_special_tokens=False).input_ids
        if old_ids:
            new_tokens[index] = old_tokens[old_ids].mean(dim=0)
    old_positions = old.embeddings.position_embedding.weight
    new_positions = new.embeddings.position_embedding.weight
    n = min(len(old_positions), len(new_positions))
    new_positions[:n] = old_positions[:n]
    print(f"warm start from {root}: text encoder, unet, unet_edge", flush=True)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- data ---------------------------------------------------------------------------------------------


def render_batch(scenes: list[data.Scene]) -> torch.Tensor:
    """(B, 3, 32, 32) in [-1, 1]."""
    array = np.stack([np.asarray(data.render(s), dtype=np.float32) for s in scenes])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """Token ids padded exactly as StableDiffusionPipeline.encode_prompt pads them."""
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


# --- checkpoints / export -------------------------------------------------------------------------------


def atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_pipeline(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    unet_edge: UNet2DConditionModel,
) -> None:
    """Writes the cloud StableDiffusionPipeline plus `unet_edge/`, swapping the directory in at the end."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    unet_edge.save_pretrained(tmp / "unet_edge", safe_serialization=True)
    readme = out / "README.md"
    if readme.exists():
        shutil.copy(readme, tmp / "README.md")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --- training -------------------------------------------------------------------------------------------


def train_vae(config: TrainConfig, vae: AutoencoderKL, state: dict, run_dir: Path, scenes) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 1)
    start_step, elapsed_before = 0, 0.0
    if state.get("phase") == "vae":
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["vae_optimizer"])
        generator.set_state(state["generator"])
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
    started = last_checkpoint = time.monotonic()
    budget_s = 60 * config.vae_minutes
    progress = tqdm(
        range(start_step, config.vae_steps), desc="vae", initial=start_step, total=config.vae_steps
    )
    for step in progress:
        elapsed = elapsed_before + time.monotonic() - started
        # Cosine decay over whichever runs out first, the steps or the time budget.
        progress_fraction = max(step / config.vae_steps, elapsed / budget_s if budget_s else 0.0)
        if progress_fraction >= 1.0:
            print(f"vae: time budget of {config.vae_minutes} min reached at step {step}", flush=True)
            break
        lr = config.vae_lr * 0.5 * (1 + math.cos(math.pi * progress_fraction))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(scenes), (config.vae_batch_size,), generator=generator)
        x = render_batch([scenes[i] for i in index.tolist()])  # (B, 3, 32, 32)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + config.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            progress.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.1f}")
            print(f"vae step {step} mse {mse.item():.5f} kl {kl.item():.2f}", flush=True)
        if time.monotonic() - last_checkpoint > 60 * config.checkpoint_every_min:
            atomic_save(
                {
                    "phase": "vae",
                    "step": step + 1,
                    "vae": vae.state_dict(),
                    "vae_optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "config": asdict(config),
                    "elapsed_s": elapsed_before + time.monotonic() - started,
                },
                run_dir / "checkpoint.pt",
            )
            last_checkpoint = time.monotonic()


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, scenes, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every scene, each (N, 4, 8, 8)."""
    means, stds = [], []
    for start in tqdm(range(0, len(scenes), batch_size), desc="encode"):
        posterior = vae.encode(render_batch(scenes[start : start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_reconstruction_scores(vae: AutoencoderKL, n: int = 200) -> dict[str, float]:
    """Judge scores of VAE reconstructions of held-out scenes: the ceiling for the diffusion models."""
    scenes = data.heldout_scenes(n)
    x = render_batch(scenes)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    array = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(a) for a in array]
    return judge.mean_scores(images, [data.caption(s) for s in scenes])


def decoder_step(
    vae: AutoencoderKL,
    optimizer: torch.optim.Optimizer,
    scenes: list[data.Scene],
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
) -> float:
    """One MSE step of the decoder on z ~ q(z | x) from the cached posteriors (the encoder stays frozen)."""
    index = torch.randint(len(scenes), (config.batch_size,), generator=generator)
    z = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)
    x = render_batch([scenes[i] for i in index.tolist()])  # (B, 3, 32, 32)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    loss = F.mse_loss(vae.decode(z).sample, x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    for p in params:
        p.requires_grad_(False)
    return loss.item()


def append_metrics(path: Path, metrics: dict[str, float]) -> None:
    """Appends a row; rewrites the file when the columns changed (e.g. resumed with a newer version)."""
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    columns = list(dict.fromkeys([*(rows[0].keys() if rows else []), *metrics]))
    if rows and list(rows[0].keys()) != columns:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new_file:
            writer.writeheader()
        writer.writerow(metrics)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=False):
            e.lerp_(p, 1 - decay)


def snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, min_x0_weight: float = 0.0
) -> torch.Tensor:
    """Epsilon-loss weights min(max(SNR, min_x0_weight), gamma) / SNR: min-SNR-gamma (Hang et al. 2023)
    with an optional floor on the implied x0 weight (an epsilon error e is an x0 error e / sqrt(SNR))."""
    alpha_bar = alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    x0_weight = snr.clone()
    if gamma > 0:
        x0_weight = torch.clamp(x0_weight, max=gamma)
    if min_x0_weight > 0:
        x0_weight = torch.clamp(x0_weight, min=min_x0_weight)
    return x0_weight / snr


def evaluate_export(config: TrainConfig, out: Path) -> dict[str, float]:
    result = {}
    for variant, steps in (("cloud", config.eval_steps), ("edge", config.eval_edge_steps)):
        pipe = sample.load_pipeline(out, variant)
        scores = sample.evaluate(pipe, config.eval_prompts, steps, config.eval_guidance)
        result.update({f"{variant}_{k}": v for k, v in scores.items()})
    return result


def train(config: TrainConfig) -> None:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    run_dir, out = Path(config.run_dir), Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    checkpoint_path = run_dir / "checkpoint.pt"
    state = torch.load(checkpoint_path, weights_only=False) if checkpoint_path.exists() else {}
    if state:
        print(f"resuming from {checkpoint_path}: phase {state['phase']} step {state['step']}", flush=True)

    tokenizer = write_clip_tokenizer(run_dir / "tokenizer", data.vocabulary(), config.model_max_length)
    scenes = data.training_scenes(config.num_scenes, config.seed, config.two_shape_probability)
    captions = [data.caption(s) for s in scenes]
    longest = max(len(tokenizer(c).input_ids) for c in captions[:2000])
    if longest > config.model_max_length:
        raise ValueError(f"model_max_length={config.model_max_length} < longest caption ({longest} tokens)")

    # 1. VAE
    vae = make_vae(config)
    if state.get("phase") == "unet":
        vae.load_state_dict(state["vae"])
    else:
        if config.init_from:  # then --vae-steps fine-tune it (0 keeps it as it is)
            load_weights(vae, AutoencoderKL.from_pretrained(config.init_from, subfolder="vae"), "vae")
        train_vae(config, vae, state, run_dir, scenes)
    vae.eval().requires_grad_(False)
    print(f"vae reconstruction judge scores: {json.dumps(vae_reconstruction_scores(vae))}", flush=True)

    # 2. Models (first, so that a bad --init-from fails before the slow encoding)
    text_encoder = make_text_encoder(config, tokenizer)
    unet = make_unet(config.cloud_channels, config.cloud_layers_per_block, config.text_hidden, edge=False)
    unet_edge = make_unet(config.edge_channels, 1, config.text_hidden, edge=True)
    models = {"text_encoder": text_encoder, "unet": unet, "unet_edge": unet_edge}
    if config.init_from and state.get("phase") != "unet":
        warm_start(config.init_from, tokenizer, models)
    print(
        "params: "
        + ", ".join(f"{k} {count_params(m) / 1e6:.2f}M" for k, m in models.items())
        + f", vae {count_params(vae) / 1e6:.2f}M",
        flush=True,
    )
    # 3. Cache latents and compute the scaling factor.
    latent_mean, latent_std = encode_scenes(vae, scenes)  # (N, 4, 8, 8) each
    scaling_factor = float(1.0 / latent_mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    print(f"latents {tuple(latent_mean.shape)} scaling_factor {scaling_factor:.4f}", flush=True)
    token_ids = tokenize(tokenizer, captions, config.model_max_length)  # (N, L)
    empty_ids = tokenize(tokenizer, [""], config.model_max_length)[0]  # (L,)

    emas = {k: copy.deepcopy(m).requires_grad_(False) for k, m in models.items()}
    optimizer = torch.optim.AdamW(
        [p for m in models.values() for p in m.parameters()], lr=config.lr, weight_decay=0.01
    )
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(config.seed + 2)
    decoder_params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    decoder_optimizer = torch.optim.AdamW(decoder_params, lr=config.decoder_lr, weight_decay=0.0)
    start_step, elapsed_before = 0, 0.0
    if state.get("phase") == "unet":
        for k, m in models.items():
            m.load_state_dict(state[k])
            emas[k].load_state_dict(state["ema_" + k])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        if "decoder_optimizer" in state:
            decoder_optimizer.load_state_dict(state["decoder_optimizer"])
    started = time.monotonic()
    budget_s = 60 * config.minutes

    def checkpoint(step: int) -> None:
        payload = {
            "phase": "unet",
            "step": step,
            "vae": vae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "decoder_optimizer": decoder_optimizer.state_dict(),
        }
        payload["generator"] = generator.get_state()
        payload["config"] = asdict(config)
        payload["elapsed_s"] = elapsed_before + time.monotonic() - started
        for k, m in models.items():
            payload[k] = m.state_dict()
            payload["ema_" + k] = emas[k].state_dict()
        atomic_save(payload, checkpoint_path)

    def export_and_evaluate(step: int) -> None:
        export_pipeline(out, vae, emas["text_encoder"], tokenizer, emas["unet"], emas["unet_edge"])
        started = time.perf_counter()
        vae_scores = vae_reconstruction_scores(vae)
        metrics = {"step": step, "vae_accuracy": vae_scores["accuracy"], "vae_exact": vae_scores["exact"]}
        metrics["vae_kind"] = vae_scores["kind"]
        metrics.update(evaluate_export(config, out))
        metrics["eval_s"] = time.perf_counter() - started
        print("eval " + json.dumps({k: round(v, 4) for k, v in metrics.items()}), flush=True)
        append_metrics(run_dir / "metrics.csv", metrics)

    if start_step == 0:
        checkpoint(0)  # the VAE phase is never redone after this point
    last_checkpoint = time.monotonic()
    for m in models.values():
        m.train()
    progress = tqdm(range(start_step, config.steps), desc="diffusion", initial=start_step, total=config.steps)
    running = None
    last_eval_s = 0.0
    final_step = start_step
    for step in progress:
        # Stop early when the time left cannot fit another step plus the final export/evaluation.
        if budget_s and elapsed_before + time.monotonic() - started + last_eval_s > budget_s:
            print(f"diffusion: time budget of {config.minutes} min reached at step {step}", flush=True)
            break
        for group in optimizer.param_groups:  # linear warmup, then constant; the EMA does the averaging
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
        index = torch.randint(len(scenes), (config.batch_size,), generator=generator)
        # z_0 ~ q(z | x), scaled to unit variance as in SD.
        eps_vae = torch.randn(latent_mean[index].shape, generator=generator)
        z0 = (latent_mean[index] + latent_std[index] * eps_vae) * scaling_factor  # (B, 4, 8, 8)
        ids = token_ids[index].clone()
        drop = torch.rand(config.batch_size, generator=generator) < config.drop_caption
        ids[drop] = empty_ids
        noise = torch.randn(z0.shape, generator=generator)  # eps
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator
        )
        zt = scheduler.add_noise(z0, noise, timesteps)  # q_sample: sqrt(a_bar) z0 + sqrt(1 - a_bar) eps
        weights = snr_weights(alphas_cumprod, timesteps, config.min_snr_gamma, config.min_x0_weight)

        context = text_encoder(ids)[0]  # (B, L, text_hidden)
        eps_cloud = unet(zt, timesteps, context).sample
        eps_edge = unet_edge(zt, timesteps, context.detach()).sample
        loss_cloud = (weights * ((eps_cloud - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        loss_edge = (weights * ((eps_edge - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        (loss_cloud + loss_edge).backward()
        torch.nn.utils.clip_grad_norm_([p for m in models.values() for p in m.parameters()], 1.0)
        optimizer.step()
        for k, m in models.items():
            ema_update(emas[k], m, config.ema_decay if step > config.warmup_steps else 0.9)

        if config.decoder_every and step % config.decoder_every == 0:
            decoder_step(vae, decoder_optimizer, scenes, latent_mean, latent_std, config, generator)

        losses = torch.tensor([loss_cloud.item(), loss_edge.item()])
        running = losses if running is None else 0.98 * running + 0.02 * losses
        if step % 50 == 0:
            progress.set_postfix(cloud=f"{running[0]:.4f}", edge=f"{running[1]:.4f}")
            print(f"step {step} loss_cloud {running[0]:.5f} loss_edge {running[1]:.5f}", flush=True)
        done = final_step = step + 1
        if time.monotonic() - last_checkpoint > 60 * config.checkpoint_every_min:
            checkpoint(done)
            last_checkpoint = time.monotonic()
        if done % config.export_every == 0 or done == config.steps:
            for m in models.values():
                m.eval()
            eval_started = time.monotonic()
            export_and_evaluate(done)
            last_eval_s = time.monotonic() - eval_started
            for m in models.values():
                m.train()
    checkpoint(final_step)
    if (final_step % config.export_every != 0 and final_step != config.steps) or start_step == final_step:
        export_and_evaluate(final_step)  # stopped by the time budget, or resumed after the end
    print(f"done: pipeline in {out}", flush=True)


# the --help line of each TrainConfig field (the comments on the fields say why the defaults are so)
FLAG_HELP: dict[str, str] = {
    "out": "diffusers export folder, written at every export",
    "run_dir": "checkpoints, metrics.csv and config.json; a rerun resumes from its checkpoint",
    "init_from": "warm start from this diffusers export (same architecture); empty: from scratch",
    "seed": "seeds data, initialisation, noise and batches",
    "threads": "torch threads",
    "num_scenes": "training scenes, rendered once and cached as latents",
    "model_max_length": "tokenizer length in tokens",
    "two_shape_probability": "share of two-shape training scenes",
    "vae_steps": "VAE phase steps (0 keeps the --init-from VAE)",
    "vae_batch_size": "VAE batch size",
    "vae_lr": "VAE learning rate",
    "vae_kl_weight": "weight of the VAE's KL term",
    "vae_channels": "VAE block channels",
    "steps": "diffusion phase steps",
    "batch_size": "diffusion batch size",
    "lr": "diffusion learning rate (UNets, text encoder)",
    "warmup_steps": "learning-rate warm-up steps",
    "ema_decay": "decay of the exported EMA weights",
    "decoder_every": "one VAE decoder step every this many diffusion steps (0: none)",
    "decoder_lr": "VAE decoder learning rate in the diffusion phase",
    "drop_caption": "probability of training on the empty prompt (for classifier-free guidance)",
    "min_snr_gamma": "min-SNR loss weighting gamma (0: off)",
    "min_x0_weight": "lower bound of the loss weight in x0 terms (0: plain min-SNR)",
    "text_hidden": "text encoder hidden size",
    "text_layers": "text encoder layers",
    "cloud_channels": "cloud UNet block channels",
    "cloud_layers_per_block": "cloud UNet layers per block",
    "edge_channels": "edge UNet block channels",
    "export_every": "diffusion steps between EMA exports and judge evaluations",
    "eval_prompts": "held-out prompts of each evaluation",
    "eval_steps": "cloud DDIM steps at evaluation",
    "eval_edge_steps": "edge preview DDIM steps at evaluation",
    "eval_guidance": "classifier-free guidance scale at evaluation",
    "checkpoint_every_min": "minutes between checkpoints",
    "vae_minutes": "wall-clock cap of the VAE phase (0: none)",
    "minutes": "wall-clock cap of the diffusion phase, exports included (0: none)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        prog="diffusionx train-shapes",
    )
    for field in fields(TrainConfig):
        default = getattr(TrainConfig, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, tuple):
            text = f"{FLAG_HELP[field.name]} (default: {' '.join(map(str, default))})"
            parser.add_argument(flag, type=int, nargs="+", default=default, help=text)
        else:
            text = f"{FLAG_HELP[field.name]} (default: {default})"
            parser.add_argument(flag, type=type(default), default=default, help=text)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    options: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    config = TrainConfig(**options)
    train(config)


if __name__ == "__main__":
    main()
