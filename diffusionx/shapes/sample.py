"""Sample the embedded shapes pipelines on held-out prompts and score the images with the judge.

diffusionx sample-shapes --root diffusionx/models/shapes --variant cloud --steps 20 --n 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from diffusionx.shapes import data, judge

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "models" / "shapes"
EVAL_SEED = 1234  # held-out prompt seed and sampling seed used for every reported figure


def load_pipeline(root: str | Path = DEFAULT_ROOT, variant: str = "cloud") -> StableDiffusionPipeline:
    """cloud = the saved pipeline; edge = the same pipeline with the `unet_edge` UNet."""
    if variant not in ("cloud", "edge"):
        raise ValueError(f"variant={variant!r} must be 'cloud' or 'edge'")
    kwargs = {}
    if variant == "edge":
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(root, subfolder="unet_edge")
    pipe = StableDiffusionPipeline.from_pretrained(root, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    num_inference_steps: int,
    guidance_scale: float,
    seed: int = EVAL_SEED,
    batch_size: int = 32,
) -> list[Image.Image]:
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed + start)
        out = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pil",
        )
        images.extend(out.images)
    return images


def evaluate(
    pipe: StableDiffusionPipeline,
    n: int = 64,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = EVAL_SEED,
) -> dict[str, float]:
    """Judge scores on `n` held-out prompts plus the measured seconds per image."""
    prompts = data.heldout_prompts(n, seed)
    start = time.perf_counter()
    images = generate(pipe, prompts, num_inference_steps, guidance_scale, seed)
    seconds = time.perf_counter() - start
    result = judge.mean_scores(images, prompts)
    result["s_per_image"] = seconds / n
    return result


def latency_s_per_image(
    pipe: StableDiffusionPipeline, num_inference_steps: int, guidance_scale: float, repeats: int = 5
) -> float:
    """Median wall seconds for one single-prompt call (text encoding, denoising loop and VAE decode)."""
    prompt = data.heldout_prompts(1, EVAL_SEED)[0]
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        generate(pipe, [prompt], num_inference_steps, guidance_scale, seed=i, batch_size=1)
        times.append(time.perf_counter() - start)
    return float(sorted(times[1:])[repeats // 2])  # the first call warms up


SWEEP_GRID: dict[str, list[tuple[int, float]]] = {
    "cloud": [(10, 4.0), (20, 2.0), (20, 4.0), (20, 6.0), (30, 4.0), (50, 4.0)],
    "edge": [(4, 4.0), (6, 4.0), (8, 2.0), (8, 4.0), (12, 4.0), (20, 4.0)],
}


def sweep(root: str | Path, n: int, grid: dict[str, list[tuple[int, float]]] = SWEEP_GRID) -> dict:
    rows: list[dict[str, Any]] = []
    for variant, settings in grid.items():
        pipe = load_pipeline(root, variant)
        for steps, guidance in settings:
            scores = evaluate(pipe, n, steps, guidance)
            scores["latency_s"] = latency_s_per_image(pipe, steps, guidance)
            # UNet cost in parameter-steps (millions): deterministic, unlike wall time on a shared machine
            # (a classifier-free-guided step doubles the batch for both variants alike)
            scores["unet_mparam_steps"] = steps * sum(p.numel() for p in pipe.unet.parameters()) / 1e6
            rows.append({"variant": variant, "steps": steps, "guidance": guidance, "n": n, **scores})
            print(json.dumps(rows[-1]), flush=True)
    cloud = max(
        (r for r in rows if r["variant"] == "cloud"), key=lambda r: (round(r["accuracy"], 2), -r["steps"])
    )
    cheap = [
        r for r in rows if r["variant"] == "edge" and r["unet_mparam_steps"] * 3 <= cloud["unet_mparam_steps"]
    ]
    edge = max(cheap, key=lambda r: (round(r["accuracy"], 2), -r["steps"])) if cheap else None
    return {"rows": rows, "cloud": cloud, "edge": edge}


def quality_markdown(result: dict) -> str:
    lines = [
        "| variant | DDIM steps | guidance | judge accuracy | exact match | kind | colour | size | position "
        "| background | UNet cost (M param-steps) | s/image (batch 1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r['guidance']} | {r['accuracy']:.3f} | {r['exact']:.3f} "
            f"| {r['kind']:.2f} | {r['colour']:.2f} | {r['size']:.2f} | {r['position']:.2f} "
            f"| {r['background']:.2f} | {r['unet_mparam_steps']:.0f} | {r['latency_s']:.3f} |"
        )
    cloud, edge = result["cloud"], result["edge"]
    summary = [
        f"Recommended: **cloud** {cloud['steps']} steps, guidance {cloud['guidance']} "
        f"(accuracy {cloud['accuracy']:.3f}, exact {cloud['exact']:.3f}, {cloud['latency_s']:.3f} s/image)."
    ]
    if edge:
        summary.append(
            f"**Edge preview** {edge['steps']} steps, guidance {edge['guidance']} (accuracy "
            f"{edge['accuracy']:.3f}, exact {edge['exact']:.3f}, {edge['latency_s']:.3f} s/image, "
            f"{cloud['unet_mparam_steps'] / edge['unet_mparam_steps']:.1f}x less UNet work than the cloud "
            "setting)."
        )
    n = result["rows"][0]["n"]
    note = (
        f"Judge scores on {n} held-out prompts (seed {EVAL_SEED}); latency is the median of 5 single-prompt "
        "calls on 1 CPU thread of the build machine (shared and busy, so treat it as approximate; the "
        "UNet cost column is exact)."
    )
    return "\n".join([" ".join(summary), "", *lines, "", note])


def write_quality_section(readme: str | Path, result: dict) -> None:
    """Replaces the text between <!-- QUALITY --> and <!-- /QUALITY --> in the model card."""
    path = Path(readme)
    text = path.read_text()
    start, end = "<!-- QUALITY -->", "<!-- /QUALITY -->"
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} section to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{quality_markdown(result)}\n{end}{tail}")


def save_grid(images: list[Image.Image], path: str | Path, columns: int = 8, scale: int = 4) -> None:
    side = images[0].width
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * side, rows * side))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * side, (i // columns) * side))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffusionx sample-shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="pipeline directory (default: embedded)")
    parser.add_argument(
        "--variant", choices=("cloud", "edge"), default="cloud", help="which UNet samples (default cloud)"
    )
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale (default 4.0)")
    parser.add_argument("--n", type=int, default=64, help="held-out prompts (default 64)")
    parser.add_argument(
        "--seed", type=int, default=EVAL_SEED, help=f"prompt and sampling seed (default {EVAL_SEED})"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--grid", default=None, help="optional PNG path for a grid of the samples")
    parser.add_argument("--sweep", action="store_true", help="score SWEEP_GRID for both variants")
    parser.add_argument("--json", default=None, help="with --sweep: write the results here")
    parser.add_argument("--readme", default=None, help="with --sweep: fill this model card's QUALITY section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sweep:
        result = sweep(args.root, args.n)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        if args.readme:
            write_quality_section(args.readme, result)
        print(quality_markdown(result))
        return 0
    pipe = load_pipeline(args.root, args.variant)
    result = evaluate(pipe, args.n, args.steps, args.guidance, args.seed)
    if args.grid:
        prompts = data.heldout_prompts(min(args.n, 32), args.seed)
        save_grid(generate(pipe, prompts, args.steps, args.guidance, args.seed), args.grid)
    print(json.dumps({"variant": args.variant, "steps": args.steps, "guidance": args.guidance, **result}))
    return 0


if __name__ == "__main__":
    main()
