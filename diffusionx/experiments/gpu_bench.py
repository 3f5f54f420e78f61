"""`diffusionx gpu-bench`: model-side throughput of the two tiers on a CUDA machine, in fp16.

For the edge model (previews) and the cloud model (refinements), in-process through the library's own
functions (no serving layer, so this is the model time the serving overhead is compared against):

1. seconds per denoising step by batch size (default 1, 2, 4, 8, 16): one classifier-free-guided UNet call
   (2B rows) plus the DDIM update, median of `--repeats` after warm-up, and the peak GPU memory of it;
2. images per second of whole previews (edge, text-to-image at the preview step count) and of whole
   refinements (cloud, img2img at strength 0.5) at each batch size, peak GPU memory included;
3. step-level batching: B refinements of mixed strengths (0.3 ... 0.7) against B of one strength (0.5),
   each run bucketed by strength (`generation.refine`) and step-batched (`StepBatcher`): wall time,
   images/s and UNet calls.

Writes gpu_bench.json and gpu_bench.md under `--out`. Defaults are the production-size pair with random
weights (`tiny-sd-arch` / `sd15-arch` at 512x512); `--edge-model/--cloud-model` take real checkpoints.
Without CUDA it refuses, unless `--tiny` (tiny-random models at 32x32 on the CPU, fp32: the check that keeps
this script working where no GPU is) or `--device cpu` is given.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffusionx.experiments.outputs import bench_results_dir
from diffusionx.models.loading import LoadedModel, load_model
from diffusionx.requests import Img2ImgRequest, PreviewRequest
from diffusionx.sampling.generation import (
    encode_prompt,
    latent_shape,
    make_scheduler,
    predict_noise,
    preview,
    refine,
    seeded_noise,
)
from diffusionx.sampling.step_batching import StepBatcher

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
DEFAULT_OUT = bench_results_dir("gpu")
PROMPT = "a photo of an astronaut riding a horse on the moon"
MIXED_STRENGTHS = (0.3, 0.7)  # spread evenly over the batch; their mean is the uniform strength
UNIFORM_STRENGTH = 0.5
MIB = 1024 * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured(model: LoadedModel, run: Callable[[], Any]) -> tuple[float, float | None, Any]:
    """Runs `run` once: (seconds, peak GPU memory in MiB or None off CUDA, its result)."""
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
    return seconds, peak, result


def measured_load(device: torch.device, load: Callable[[], LoadedModel]) -> tuple[float, None, LoadedModel]:
    """Seconds to load a model onto `device` (weights from disk or cache), and the model."""
    synchronize(device)
    start = time.perf_counter()
    model = load()
    synchronize(device)
    return time.perf_counter() - start, None, model


def guarded(function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A measurement, or {"oom": True} when the GPU ran out of memory (the table says so)."""
    try:
        return function()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True}


def step_seconds(model: LoadedModel, batch_size: int, size: int, repeats: int, warmup: int) -> dict[str, Any]:
    """One denoising step at `batch_size`: eps_theta on [uncond; cond] (2B rows) and the DDIM update."""
    guidance = model.spec.guidance_scale
    embeddings = encode_prompt(model, [PROMPT] * batch_size, guidance)  # (2B, 77, 768)
    latents = seeded_noise(range(batch_size), latent_shape(model, size, size), model)  # (B, 4, H/8, W/8)
    scheduler = make_scheduler(model, model.spec.default_steps)
    t = scheduler.timesteps[0]

    @torch.no_grad()
    def one_step() -> torch.Tensor:
        noise_pred = predict_noise(model.unet, latents, t, embeddings, guidance)
        return scheduler.step(noise_pred, t, latents).prev_sample

    for _ in range(warmup):
        measured(model, one_step)
    runs = [measured(model, one_step) for _ in range(repeats)]
    peaks = [peak for _, peak, _ in runs if peak is not None]
    return {
        "seconds_per_step": round(statistics.median(s for s, _, _ in runs), 5),
        "peak_memory_mib": round(max(peaks), 1) if peaks else None,
    }


def images_per_second(
    model: LoadedModel, run: Callable[[LoadedModel, list], list], requests: list
) -> dict[str, Any]:
    """Whole requests (encode, denoise, decode) as one batch: images/s and peak memory."""
    batch_size = len(requests)
    seconds, peak, _ = measured(model, lambda: run(model, requests))
    return {
        "seconds": round(seconds, 4),
        "images_per_s": round(batch_size / seconds, 4),
        "peak_memory_mib": None if peak is None else round(peak, 1),
    }


def step_batching(model: LoadedModel, image: Any, batch_size: int, steps: int) -> dict[str, Any]:
    """Mixed against uniform strengths, bucketed (`refine`) against step-batched (`StepBatcher`)."""
    low, high = MIXED_STRENGTHS
    mixed = [round(low + (high - low) * i / max(batch_size - 1, 1), 3) for i in range(batch_size)]
    rows: dict[str, Any] = {"batch_size": batch_size, "num_inference_steps": steps, "mixed_strengths": mixed}
    for name, strengths in (("uniform", [UNIFORM_STRENGTH] * batch_size), ("mixed", mixed)):
        requests = [
            Img2ImgRequest(PROMPT, image, s, seed=i, num_inference_steps=steps)
            for i, s in enumerate(strengths)
        ]

        def bucketed(requests: list = requests) -> int:
            results = refine(model, requests)
            # one batch per distinct strength, each as many UNet calls as its steps
            return sum({r.strength: r.unet_calls.cloud for r in results}.values())

        def step_batched(requests: list = requests) -> int:
            batcher = StepBatcher(model, batch_size, tier="cloud")
            for request in requests:
                batcher.add(request)
            batcher.run_until_idle()
            return batcher.unet_invocations

        for how, run in (("bucketed", bucketed), ("step_batched", step_batched)):

            def one(run: Callable[[], int] = run) -> dict[str, Any]:
                seconds, peak, unet_calls = measured(model, run)
                return {
                    "seconds": round(seconds, 4),
                    "images_per_s": round(batch_size / seconds, 4),
                    "unet_calls": unet_calls,
                    "peak_memory_mib": None if peak is None else round(peak, 1),
                }

            rows[f"{name}_{how}"] = guarded(one)
    return rows


def bench(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    # load times (a GPU-timed replica's start-up, diffusionx.models.gpu_timed): the edge model's without
    # the components it shares with the cloud model
    load_s, _, cloud = measured_load(
        device, lambda: load_model(args.cloud_model, device=device, dtype=args.dtype)
    )
    share = cloud if _same_family(args.edge_model, cloud) else None
    edge_load_s, _, edge = measured_load(
        device, lambda: load_model(args.edge_model, device=device, dtype=args.dtype, share_with=share)
    )
    loads = {"cloud": round(load_s, 3), "edge": round(edge_load_s, 3)}
    size = args.size or cloud.spec.default_size
    preview_steps = args.preview_steps or edge.spec.preview_steps
    refine_steps = args.refine_steps or cloud.spec.default_steps

    def previews(batch_size: int) -> list[PreviewRequest]:
        return [
            PreviewRequest(PROMPT, seed=i, width=size, height=size, num_inference_steps=preview_steps)
            for i in range(batch_size)
        ]

    image = preview(edge, previews(1))[0].image  # also warms the edge model and the VAE up

    def refinements(batch_size: int) -> list[Img2ImgRequest]:
        return [
            Img2ImgRequest(PROMPT, image, UNIFORM_STRENGTH, seed=i, num_inference_steps=refine_steps)
            for i in range(batch_size)
        ]

    refine(cloud, refinements(1))  # warm-up
    models = {}
    for role, model, make, run in (("edge", edge, previews, preview), ("cloud", cloud, refinements, refine)):
        rows = []
        for batch_size in args.batch_sizes:
            row: dict[str, Any] = {"batch_size": batch_size}
            row["step"] = guarded(
                functools.partial(step_seconds, model, batch_size, size, args.repeats, args.warmup)
            )
            row["requests"] = guarded(functools.partial(images_per_second, model, run, make(batch_size)))
            rows.append(row)
            print(_row_line(role, model.spec.name, row), flush=True)
        models[role] = {
            "model": model.spec.name,
            "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
            "requests": "previews" if role == "edge" else f"refinements at strength {UNIFORM_STRENGTH}",
            "num_inference_steps": preview_steps if role == "edge" else refine_steps,
            "load_s": loads[role],
            "rows": rows,
        }
    batching = step_batching(cloud, image, args.mixed_batch_size or max(args.batch_sizes), refine_steps)
    return {
        "benchmark": "gpu",
        "setup": {
            "device": _device_name(device),
            "dtype": str(cloud.dtype).removeprefix("torch."),
            "size": size,
            "batch_sizes": args.batch_sizes,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "models": models,
        "step_batching": batching,
    }


def _same_family(edge_name: str, cloud: LoadedModel) -> bool:
    from diffusionx.models.registry import get_spec

    return get_spec(edge_name).family == cloud.spec.family


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _cell(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row_line(role: str, model_name: str, row: dict[str, Any]) -> str:
    step, requests = row["step"], row["requests"]
    step_cell = "OOM" if step.get("oom") else _cell(step["seconds_per_step"], 4)
    step_mem = "OOM" if step.get("oom") else _cell(step["peak_memory_mib"], 0)
    ips = "OOM" if requests.get("oom") else _cell(requests["images_per_s"], 3)
    req_mem = "OOM" if requests.get("oom") else _cell(requests["peak_memory_mib"], 0)
    return f"| {role} | `{model_name}` | {row['batch_size']} | {step_cell} | {step_mem} | {ips} | {req_mem} |"


def format_markdown(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        "# GPU benchmark\n",
        f"Device: {setup['device']}; dtype {setup['dtype']}; {setup['size']}x{setup['size']}; "
        f"median of {setup['repeats']} steps after {setup['warmup']} warm-up; torch {setup['torch']}.\n",
        "A step is one classifier-free-guided UNet call (2B rows) plus the DDIM update. images/s counts "
        "whole requests (text encoder, denoising, VAE): previews on the edge model, refinements on the "
        "cloud model. Memory is torch's peak allocation.\n",
        "| tier | model | batch | s / step | peak MiB (step) | images/s | peak MiB (requests) |",
        "|---|---|---|---|---|---|---|",
    ]
    for role, entry in report["models"].items():
        for row in entry["rows"]:
            lines.append(_row_line(role, entry["model"], row))
    batching = report["step_batching"]
    lines += [
        "",
        f"Step-level batching on the cloud model: {batching['batch_size']} refinements, "
        f"{batching['num_inference_steps']} steps; mixed strengths {batching['mixed_strengths']} against "
        f"all at {UNIFORM_STRENGTH}.\n",
        "| strengths | scheduling | seconds | images/s | UNet calls | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("uniform", "mixed"):
        for how in ("bucketed", "step_batched"):
            cell = batching[f"{name}_{how}"]
            if cell.get("oom"):
                lines.append(f"| {name} | {how} | OOM | | | |")
                continue
            lines.append(
                f"| {name} | {how.replace('_', '-')} | {cell['seconds']:.3f} | {cell['images_per_s']:.3f} "
                f"| {cell['unet_calls']} | {_cell(cell['peak_memory_mib'], 0)} |"
            )
    return "\n".join(lines) + "\n"


def _batch_sizes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-sizes {text!r}: use comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batch-sizes {text!r}: every batch size must be at least 1")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="diffusionx gpu-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--edge-model", default="tiny-sd-arch", help="edge model (default tiny-sd-arch)")
    parser.add_argument("--cloud-model", default="sd15-arch", help="cloud model (default sd15-arch)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--dtype", help="float16 | bfloat16 | float32 (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--size", type=int, help="width and height (default: the cloud model's, 512)")
    parser.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=list(DEFAULT_BATCH_SIZES),
        help=f"batch sizes timed per tier (default {','.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    parser.add_argument("--mixed-batch-size", type=int, help="batch of the step-batching comparison (max)")
    parser.add_argument("--preview-steps", type=int, help="steps per preview (default: the edge model's)")
    parser.add_argument("--refine-steps", type=int, help="schedule length of refinements (default: cloud's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per batch size (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    parser.add_argument(
        "--tiny", action="store_true", help="CPU check: tiny-random models at 32x32, fp32, small batches"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.edge_model, args.cloud_model, args.device = "tiny-random-edge", "tiny-random", "cpu"
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run this on a GPU machine, or pass --tiny (or --device cpu)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = format_markdown(report)
    (out / "gpu_bench.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
