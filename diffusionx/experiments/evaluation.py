"""`diffusionx eval`: quality and cost of one collaboration mode on held-out shapes prompts.

Algorithm: draw `n` held-out captions (`shapes.data.heldout_prompts`, a seed stream disjoint from
training), generate one image per caption with the served workflow `workflows.modes.generate` on
in-process tiers (image seed = `--seed` + index, `--batch-size` requests in flight at once, merged into
batches by the tiers' model loops as the server does), and score each image against its caption with the
deterministic judge (`shapes.judge.score`). Quality is the mean judge accuracy; beside it, the CLIP score
of an alignment model (`models.alignment.clip_score`: shapes-clip for the shapes models, the production
CLIP for real ones, where it is the only quality column that means anything); cost is the mean
`unet_calls` per image and the wall-clock seconds per image of generation (model loading and judging
excluded).

    diffusionx eval --mode ec-diff --n 64 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from tqdm import tqdm

from diffusionx.engine.tiers import StrengthFunction
from diffusionx.models.alignment import (
    AlignmentModel,
    clip_score,
    default_alignment_model,
    load_alignment_model,
)
from diffusionx.models.loading import LoadedModel, ModelNotAvailableError, load_model
from diffusionx.models.registry import get_spec
from diffusionx.policy.strength import predict_strength
from diffusionx.requests import InvalidRequestError, Mode
from diffusionx.shapes.data import heldout_prompts
from diffusionx.shapes.judge import score
from diffusionx.workflows.local import generate_all, local_tiers
from diffusionx.workflows.modes import GenerateRequest, check_fields

DEFAULT_CLOUD = "shapes-cloud"
DEFAULT_EDGE = "shapes-edge"
DEFAULT_N = 64
DEFAULT_BATCH_SIZE = 16

# (image, caption) -> {"accuracy": ..., <attribute>: ...}
ScoreFn = Callable[[Image.Image, str], dict[str, float]]


@dataclass
class EvalReport:
    mode: str
    n: int
    quality: float  # mean judge accuracy
    exact: float  # share of images with every attribute right
    per_attribute: dict[str, float]  # mean judge score per attribute
    unet_calls: dict[str, float]  # mean per image: cloud, edge, approximated
    seconds_per_image: float
    settings: dict[str, object] = field(default_factory=dict)
    clip_score: float | None = None  # mean CLIPScore of the images against their prompts

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "n": self.n,
            "quality": self.quality,
            "exact": self.exact,
            "per_attribute": self.per_attribute,
            "unet_calls": self.unet_calls,
            "seconds_per_image": self.seconds_per_image,
            "clip_score": self.clip_score,
            "settings": self.settings,
        }

    def to_table(self) -> str:
        rows = [
            ("mode", self.mode),
            ("images", str(self.n)),
            ("quality (judge accuracy)", f"{self.quality:.4f}"),
            ("exact match", f"{self.exact:.4f}"),
            ("CLIP score", "-" if self.clip_score is None else f"{self.clip_score:.2f}"),
            *((f"  {name}", f"{value:.4f}") for name, value in self.per_attribute.items()),
            *((f"unet calls / image: {tier}", f"{calls:.2f}") for tier, calls in self.unet_calls.items()),
            ("seconds / image", f"{self.seconds_per_image:.4f}"),
            *((f"setting: {name}", str(value)) for name, value in self.settings.items() if value is not None),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def evaluate_mode(
    mode: str,
    cloud: LoadedModel | None,
    edge: LoadedModel | None,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    request_fields: dict[str, object] | None = None,
    predict: StrengthFunction = predict_strength,
    score_fn: ScoreFn | None = None,
    alignment: AlignmentModel | None = None,
    progress: bool = True,
) -> EvalReport:
    """Generates one image per prompt in `mode` and scores it with the judge (or `score_fn`).

    In `diffusionx` mode a request without `strength` is refined at the strength `predict` gives its
    preview (the served predictor by default)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: use an integer >= 1")
    score_fn = score_fn or score
    fields: dict[str, Any] = {k: v for k, v in (request_fields or {}).items() if v is not None}
    requests = [GenerateRequest(prompt, seed + index, **fields) for index, prompt in enumerate(prompts)]
    for request in requests[:1]:
        check_fields(mode, request)
    tiers = local_tiers(cloud, edge, max_batch_size=batch_size, predict=predict)
    scores: list[dict[str, float]] = []
    clip_scores: list[float] = []
    totals = {"cloud": 0, "edge": 0, "approximated": 0}
    generation_s = 0.0
    with tqdm(
        total=len(requests), desc=f"eval {mode}", unit="img", file=sys.stderr, disable=not progress
    ) as bar:
        for begin in range(0, len(requests), batch_size):
            batch = requests[begin : begin + batch_size]
            start = time.perf_counter()
            results = [generated.result for generated in generate_all(tiers, mode, batch)]
            generation_s += time.perf_counter() - start
            if alignment is not None:
                clip_scores += clip_score(alignment, [r.image for r in results], [q.prompt for q in batch])
            for request, result in zip(batch, results, strict=True):
                scores.append(score_fn(result.image, request.prompt))
                for tier, calls in result.unet_calls.to_dict().items():
                    totals[tier] += calls
            bar.update(len(batch))
    n = len(requests)
    attributes = [key for key in scores[0] if key not in ("accuracy", "exact")] if scores else []
    return EvalReport(
        mode=mode,
        n=n,
        quality=_mean([s["accuracy"] for s in scores]),
        exact=_mean([s["exact"] for s in scores]),
        per_attribute={name: _mean([s[name] for s in scores]) for name in attributes},
        unet_calls={tier: calls / n if n else 0.0 for tier, calls in totals.items()},
        seconds_per_image=generation_s / n if n else 0.0,
        settings=dict(fields),
        clip_score=_mean(clip_scores) if alignment is not None else None,
    )


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def load_pair(
    mode: str, cloud_name: str, edge_name: str, device: str | None = None
) -> tuple[LoadedModel | None, LoadedModel | None]:
    """Loads only the models `mode` uses; an edge of the cloud's family shares its VAE and text encoder."""
    cloud = load_model(cloud_name, device=device) if mode != "edge" else None
    edge = None
    if mode != "cloud":
        share = cloud if cloud is not None and get_spec(edge_name).family == cloud.spec.family else None
        edge = load_model(edge_name, device=device, share_with=share)
    return cloud, edge


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options every in-process experiment takes: the torch device and the progress bar."""
    parser.add_argument("--device", default=None, help="torch device (default: CUDA if available, else CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionx eval",
        description="Quality (judge accuracy on held-out shapes prompts) and cost (UNet calls, seconds per "
        "image) of one collaboration mode.",
    )
    parser.add_argument(
        "--mode", required=True, choices=[mode.value for mode in Mode], help="collaboration mode to evaluate"
    )
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of prompts (default {DEFAULT_N})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set seed; image i uses seed + i")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps N (default: the mode's)")
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="diffusionx: refine at this strength (default: predicted per preview, as the server does)",
    )
    parser.add_argument("--preview-steps", type=int, default=None, help="diffusionx edge preview steps")
    parser.add_argument("--switch-step", type=int, default=None, help="s: first edge step (hybrid, ec-diff)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="p: EC-Diff warm-up cloud steps")
    parser.add_argument("--approx-interval", type=int, default=None, help="k: EC-Diff extrapolated steps")
    parser.add_argument("--smoothing", type=float, default=None, help="a: EC-Diff gradient smoothing")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance weight")
    parser.add_argument("--cloud", default=DEFAULT_CLOUD, help=f"cloud model (default {DEFAULT_CLOUD})")
    parser.add_argument("--edge", default=DEFAULT_EDGE, help=f"edge model (default {DEFAULT_EDGE})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="requests per batch")
    parser.add_argument(
        "--alignment-model",
        default=None,
        help="CLIP for the CLIP score column: a registered name, hub id or local path, or 'none' "
        "(default: shapes-clip for the shapes models, clip-vit-large-patch14 for real ones)",
    )
    add_run_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n={args.n} is not allowed: use an integer >= 1")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} is not allowed: use an integer >= 1")
    request_fields = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "strength": args.strength,
        "preview_steps": args.preview_steps,
        "switch_step": args.switch_step,
        "warmup_steps": args.warmup_steps,
        "approx_interval": args.approx_interval,
        "smoothing": args.smoothing,
    }
    try:
        cloud, edge = load_pair(args.mode, args.cloud, args.edge, args.device)
        family = (cloud or edge).spec.family  # type: ignore[union-attr]
        name = args.alignment_model or default_alignment_model(family)
        alignment = None if name == "none" else load_alignment_model(name, device=args.device)
    except ModelNotAvailableError as error:
        print(f"diffusionx eval: error: {error}", file=sys.stderr)
        return 1
    try:
        report = evaluate_mode(
            args.mode,
            cloud,
            edge,
            heldout_prompts(args.n, seed=args.seed),
            seed=args.seed,
            batch_size=args.batch_size,
            request_fields=request_fields,
            alignment=alignment,
            progress=not args.no_progress,
        )
    except InvalidRequestError as error:
        parser.error(str(error))
    report.settings = {
        "cloud": args.cloud if cloud else None,
        "edge": args.edge if edge else None,
        "alignment_model": None if alignment is None else alignment.name,
        **report.settings,
    }
    if args.mode == "diffusionx" and args.strength is None:
        report.settings["strength"] = "predicted (diffusionx.policy.strength heuristic)"
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.to_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
