"""`diffusionx search`: EC-Diff's two-stage greedy search of the noise approximation and the switch step.

Objective: the fewest cloud UNet calls per image subject to `quality >= target × quality(cloud-only)`,
quality measured on a prompt set by a pluggable function (the shapes judge here; CLIP score where real CLIP
weights exist). Cloud calls of a point are known from its plan (`collaborative.plan_steps`); quality needs a
run of the sampler over the prompt set, so the search spends its evaluations greedily:

0. Baseline: cloud-only (Hybrid SD with s = N) gives quality(cloud-only) and so the threshold.
1. Stage one, s fixed at s_0 (EC-Diff's reference, round(0.74 N)), over (p, k, a). Start from no
   approximation (Hybrid SD at s_0: k = 0, the cloud runs every step before s_0). Each round looks at two
   neighbours, each the smallest cut in cloud calls in its direction: once k > 0, the next smaller p that
   saves a call; and k + 1, with the warm-up p in [2, s_0] that keeps the most cloud calls still below the
   current count. A neighbour is tried with the current a first and, only if that misses the threshold, with
   the other candidate a values in order. Move to the feasible neighbour with the fewest cloud calls (ties:
   higher quality); stop when neither is feasible. Points that compute the same images (same plan, and p, a
   where a step is extrapolated) are measured once.
2. Stage two, (p, k, a) fixed, over s >= p. Only switch steps where a cloud call would come next are
   candidates (moving s between two of them trades edge calls for extrapolated steps, no cloud call). If
   the stage-one point is feasible, step s down candidate by candidate while still feasible; if not, step
   s up until it is.

The answer is the feasible evaluated point with the fewest cloud calls (ties: higher quality, then fewer
edge calls); cloud-only when no other point is feasible. Every evaluation is logged (CSV) and the answer
written as JSON.

Symbols: p -> `warmup_steps`, k -> `approx_interval`, a -> `smoothing`, s -> `switch_step`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from diffusionx.experiments.evaluation import add_run_options
from diffusionx.models.loading import LoadedModel, ModelNotAvailableError, load_model
from diffusionx.models.registry import get_spec
from diffusionx.sampling.collaborative import (
    REFERENCE_SMOOTHING,
    CollaborationParams,
    check_pair,
    expected_unet_calls,
    plan_steps,
)
from diffusionx.shapes.data import heldout_prompts
from diffusionx.shapes.judge import score
from diffusionx.workflows.local import generate_all, local_tiers
from diffusionx.workflows.modes import GenerateRequest

DEFAULT_CLOUD = "shapes-cloud"
DEFAULT_EDGE = "shapes-edge"
DEFAULT_N = 24
DEFAULT_STEPS = 20
DEFAULT_TARGET = 0.95
DEFAULT_MAX_INTERVAL = 4
DEFAULT_SMOOTHINGS: tuple[float, ...] = (REFERENCE_SMOOTHING, 0.6, 0.0)
LOG_COLUMNS = (
    "stage",
    "p",
    "k",
    "a",
    "s",
    "cloud_calls",
    "edge_calls",
    "approx_calls",
    "quality",
    "seconds",
    "feasible",
)

# (images, prompts) -> one quality number for the set, higher is better
QualityFn = Callable[[Sequence[Image.Image], Sequence[str]], float]


def judge_quality(images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Mean shapes-judge accuracy of images against their captions."""
    return float(
        sum(score(image, prompt)["accuracy"] for image, prompt in zip(images, prompts, strict=True))
        / len(images)
    )


QUALITY_FUNCTIONS: dict[str, QualityFn] = {"judge": judge_quality}


@dataclass
class Measurement:
    quality: float
    seconds: float  # wall-clock seconds per image


# params -> quality and time of that point on the prompt set
MeasureFn = Callable[[CollaborationParams], Measurement]


@dataclass
class SearchPoint:
    stage: str  # "baseline" | "stage1" | "stage2"
    params: CollaborationParams
    quality: float
    seconds: float
    feasible: bool

    @property
    def cloud_calls(self) -> int:
        return expected_unet_calls(self.params).cloud

    def sort_key(self) -> tuple[int, float, int]:
        calls = expected_unet_calls(self.params)
        return (calls.cloud, -self.quality, calls.edge)

    def to_row(self) -> dict[str, object]:
        calls = expected_unet_calls(self.params)
        approximating = self.params.approximates
        return {
            "stage": self.stage,
            "p": self.params.warmup_steps if approximating else "",
            "k": self.params.approx_interval if approximating else "",
            "a": self.params.smoothing if approximating else "",
            "s": self.params.switch_step,
            "cloud_calls": calls.cloud,
            "edge_calls": calls.edge,
            "approx_calls": calls.approximated,
            "quality": round(self.quality, 6),
            "seconds": round(self.seconds, 6),
            "feasible": self.feasible,
        }


@dataclass
class SearchResult:
    chosen: SearchPoint
    baseline_quality: float
    threshold: float
    target: float
    log: list[SearchPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        params = self.chosen.params
        return {
            "num_inference_steps": params.num_inference_steps,
            "warmup_steps": params.warmup_steps,
            "approx_interval": params.approx_interval if params.approximates else None,
            "smoothing": params.smoothing if params.approximates else None,
            "switch_step": params.switch_step,
            "guidance_scale": params.guidance_scale,
            "unet_calls": expected_unet_calls(params).to_dict(),
            "quality": self.chosen.quality,
            "quality_cloud_only": self.baseline_quality,
            "target": self.target,
            "threshold": self.threshold,
            "seconds_per_image": self.chosen.seconds,
            "evaluations": len(self.log),
        }


def _output_key(params: CollaborationParams) -> tuple:
    """Points with equal keys compute the same images (p and a only matter once a step is extrapolated)."""
    roles = tuple(plan_steps(params))
    if "approximated" not in roles:
        return (roles, params.guidance_scale)
    return (roles, params.warmup_steps, params.smoothing, params.guidance_scale)


def switch_candidates(params: CollaborationParams) -> list[int]:
    """Switch steps s >= p worth trying: those where a cloud call would come next, and N. Between two of
    them, a later s only adds extrapolated steps in place of edge calls, never a cloud call."""
    steps = params.num_inference_steps
    full = plan_steps(dataclasses.replace(params, switch_step=steps))
    p = params.warmup_steps or 0
    return sorted({i for i, role in enumerate(full) if role == "cloud" and i >= p} | {steps})


def two_stage_search(
    measure: MeasureFn,
    num_inference_steps: int,
    *,
    target: float = DEFAULT_TARGET,
    initial_switch_step: int | None = None,
    max_approx_interval: int = DEFAULT_MAX_INTERVAL,
    smoothings: Sequence[float] = DEFAULT_SMOOTHINGS,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> SearchResult:
    """EC-Diff's two-stage greedy search (see the module docstring); `measure` runs one point."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target={target!r} is not allowed: use a number in (0, 1]")
    if not smoothings:
        raise ValueError("smoothings must hold at least one value of a")
    steps = num_inference_steps
    reference = CollaborationParams.ec_diff(steps)
    s0 = reference.switch_step if initial_switch_step is None else initial_switch_step
    if not 2 <= s0 <= steps:
        raise ValueError(
            f"initial switch step s={s0} is not allowed: use an integer from 2 (room for the two warm-up "
            f"cloud steps of the approximation) to N={steps}"
        )
    search = _Search(measure, steps, s0, max_approx_interval, smoothings, guidance_scale)
    bar = tqdm(desc="search", unit="point", file=sys.stderr, disable=not progress)
    search.bar = bar
    try:
        # 0. baseline: cloud-only
        cloud_only = CollaborationParams.hybrid(steps, switch_step=steps, guidance_scale=guidance_scale)
        baseline = search.evaluate("baseline", cloud_only, -math.inf)
        threshold = target * baseline.quality
        # 1. stage one: greedy over (p, k, a) at s = s0; 2. stage two: greedy over s with (p, k, a) fixed
        search.stage_two(search.stage_one(threshold), threshold)
    finally:
        bar.close()
    feasible = [point for point in search.log if point.feasible]
    chosen = min(feasible, key=SearchPoint.sort_key)  # the baseline is always feasible
    return SearchResult(chosen, baseline.quality, threshold, target, search.log)


@dataclass
class _Search:
    """The state of one `two_stage_search`: its settings, every point measured (`log`) and the measurements
    by output (`cache`: points that compute the same images are measured once)."""

    measure: MeasureFn
    steps: int  # N
    s0: int  # the initial switch step
    max_approx_interval: int
    smoothings: Sequence[float]
    guidance_scale: float | None
    log: list[SearchPoint] = field(default_factory=list)
    cache: dict[tuple, Measurement] = field(default_factory=dict)
    bar: Any = None  # a tqdm progress bar

    def evaluate(self, stage: str, params: CollaborationParams, threshold: float) -> SearchPoint:
        key = _output_key(params)
        if key not in self.cache:
            self.cache[key] = self.measure(params)
        measured = self.cache[key]
        point = SearchPoint(stage, params, measured.quality, measured.seconds, measured.quality >= threshold)
        self.log.append(point)
        if self.bar is not None:
            self.bar.update(1)
            approximation = (
                f"p={params.warmup_steps} k={params.approx_interval} a={params.smoothing}"
                if params.approximates
                else "no approximation"
            )
            self.bar.set_postfix_str(
                f"{stage} {approximation} s={params.switch_step} q={measured.quality:.3f}"
            )
        return point

    def make(self, p: int, k: int, a: float, s: int) -> CollaborationParams:
        return CollaborationParams(self.steps, s, p, k, a, self.guidance_scale)

    def cloud_calls(self, p: int, k: int) -> int:
        return expected_unet_calls(self.make(p, k, REFERENCE_SMOOTHING, self.s0)).cloud

    def cheaper_neighbours(self, p: int, k: int, calls: int) -> list[tuple[int, int]]:
        """The smallest cuts in cloud calls along k (k + 1 with the warm-up p that keeps the most calls)
        and along p (the next smaller warm-up that saves a call)."""
        neighbours = []
        if k > 0:  # first, so that a tie keeps the shorter interval (more frequent cloud corrections)
            smaller = [q for q in range(p - 1, 1, -1) if self.cloud_calls(q, k) < calls]
            if smaller:
                neighbours.append((smaller[0], k))
        if k < self.max_approx_interval:
            options = [(self.cloud_calls(q, k + 1), q) for q in range(2, self.s0 + 1)]
            cheaper = [option for option in options if option[0] < calls]
            if cheaper:
                neighbours.append((max(cheaper)[1], k + 1))
        return neighbours

    def stage_one(self, threshold: float) -> SearchPoint:
        """Greedy over (p, k, a) at s = s0, from Hybrid SD at s0 (no approximation): the cheapest feasible
        neighbour each round, until none is."""
        hybrid = CollaborationParams.hybrid(
            self.steps, switch_step=self.s0, guidance_scale=self.guidance_scale
        )
        current = self.evaluate("stage1", hybrid, threshold)
        p, k, a = self.s0, 0, float(self.smoothings[0])  # k = 0: the cloud runs every step before s0
        while current.feasible:
            best: tuple[SearchPoint, int, int] | None = None
            for p_next, k_next in self.cheaper_neighbours(p, k, current.cloud_calls):
                for a_next in [a, *(float(x) for x in self.smoothings if float(x) != a)]:
                    point = self.evaluate("stage1", self.make(p_next, k_next, a_next, self.s0), threshold)
                    if point.feasible:
                        if best is None or point.sort_key() < best[0].sort_key():
                            best = (point, p_next, k_next)
                        break
            if best is None:
                break
            current, p, k = best
            a = current.params.smoothing
        return current

    def stage_two(self, current: SearchPoint, threshold: float) -> None:
        """Greedy over s with (p, k, a) fixed: earlier switches while feasible, else later until feasible."""
        candidates = switch_candidates(current.params)
        if current.feasible:
            for s in reversed([s for s in candidates if s < self.s0]):
                at_s = dataclasses.replace(current.params, switch_step=s)
                if not self.evaluate("stage2", at_s, threshold).feasible:
                    break
        else:
            for s in (s for s in candidates if s > self.s0):
                at_s = dataclasses.replace(current.params, switch_step=s)
                if self.evaluate("stage2", at_s, threshold).feasible:
                    break


def make_measure(
    cloud: LoadedModel,
    edge: LoadedModel,
    prompts: Sequence[str],
    quality_fn: QualityFn,
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_N,
) -> MeasureFn:
    """Measures a point by running the sampler on every prompt (image seed = seed + index)."""
    check_pair(cloud, edge)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: use an integer >= 1")

    tiers = local_tiers(cloud, edge, max_batch_size=batch_size)

    def measure(params: CollaborationParams) -> Measurement:
        # the served workflow: hybrid when nothing is extrapolated, else ec-diff with (p, k, a, s)
        mode = "ec-diff" if params.approximates else "hybrid"
        fields: dict[str, object] = {"switch_step": params.switch_step}
        if params.approximates:
            fields.update(
                warmup_steps=params.warmup_steps,
                approx_interval=params.approx_interval,
                smoothing=params.smoothing,
            )
        requests = [
            GenerateRequest(
                prompt,
                seed + i,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                **fields,  # type: ignore[arg-type]
            )
            for i, prompt in enumerate(prompts)
        ]
        images: list[Image.Image] = []
        start = time.perf_counter()
        for begin in range(0, len(requests), batch_size):
            batch = requests[begin : begin + batch_size]
            images += [generated.result.image for generated in generate_all(tiers, mode, batch)]
        seconds = (time.perf_counter() - start) / len(requests)
        return Measurement(quality_fn(images, prompts), seconds)

    return measure


def write_outputs(result: SearchResult, out: Path, settings: dict[str, object]) -> tuple[Path, Path]:
    """Writes `params.json` (the chosen point and the settings) and `search_log.csv` (every evaluation)."""
    out.mkdir(parents=True, exist_ok=True)
    params_path, log_path = out / "params.json", out / "search_log.csv"
    params_path.write_text(json.dumps({**result.to_dict(), "settings": settings}, indent=2) + "\n")
    with log_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(point.to_row() for point in result.log)
    return params_path, log_path


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionx search",
        description="EC-Diff two-stage greedy search: fewest cloud UNet calls with quality >= target x "
        "quality(cloud-only).",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for params.json and search_log.csv"
    )
    parser.add_argument("--cloud", default=DEFAULT_CLOUD, help=f"cloud model (default {DEFAULT_CLOUD})")
    parser.add_argument("--edge", default=DEFAULT_EDGE, help=f"edge model (default {DEFAULT_EDGE})")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"held-out prompts (default {DEFAULT_N})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"N (default {DEFAULT_STEPS})")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="quality ratio to cloud-only")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set seed; image i uses seed + i")
    parser.add_argument("--switch-step", type=int, default=None, help="s_0 for stage one (default 0.74 N)")
    parser.add_argument("--max-approx-interval", type=int, default=DEFAULT_MAX_INTERVAL, help="k_max")
    parser.add_argument(
        "--smoothings",
        type=_floats,
        default=DEFAULT_SMOOTHINGS,
        help="candidate a values, the first tried first (default "
        + ",".join(map(str, DEFAULT_SMOOTHINGS))
        + ")",
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="CFG weight (default: the cloud's)"
    )
    parser.add_argument(
        "--quality", choices=sorted(QUALITY_FUNCTIONS), default="judge", help="quality measure"
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_N, help="requests per sampler batch")
    add_run_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: use an integer >= 1"
            )
    try:
        cloud = load_model(args.cloud, device=args.device)
        share = cloud if get_spec(args.edge).family == cloud.spec.family else None
        edge = load_model(args.edge, device=args.device, share_with=share)
    except ModelNotAvailableError as error:
        print(f"diffusionx search: error: {error}", file=sys.stderr)
        return 1
    prompts = heldout_prompts(args.n, seed=args.seed)
    measure = make_measure(
        cloud, edge, prompts, QUALITY_FUNCTIONS[args.quality], seed=args.seed, batch_size=args.batch_size
    )
    try:
        result = two_stage_search(
            measure,
            args.steps,
            target=args.target,
            initial_switch_step=args.switch_step,
            max_approx_interval=args.max_approx_interval,
            smoothings=args.smoothings,
            guidance_scale=args.guidance_scale,
            progress=not args.no_progress,
        )
    except ValueError as error:  # includes InvalidRequestError for impossible p, k, a, s
        parser.error(str(error))
    settings = {
        "cloud": args.cloud,
        "edge": args.edge,
        "n": args.n,
        "seed": args.seed,
        "quality": args.quality,
        "max_approx_interval": args.max_approx_interval,
        "smoothings": list(args.smoothings),
    }
    params_path, log_path = write_outputs(result, args.out, settings)
    chosen = result.to_dict()
    print(
        f"chosen p={chosen['warmup_steps']} k={chosen['approx_interval']} a={chosen['smoothing']} "
        f"s={chosen['switch_step']} (N={args.steps}): unet_calls={chosen['unet_calls']}, "
        f"quality {result.chosen.quality:.4f} vs cloud-only {result.baseline_quality:.4f} "
        f"(threshold {result.threshold:.4f}); {len(result.log)} evaluations"
    )
    print(f"wrote {params_path} and {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
