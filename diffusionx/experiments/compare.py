"""`diffusionx compare`: every collaboration mode on the same held-out prompts, one table.

cloud, edge, hybrid and ec-diff (with the parameters `diffusionx search` chose, from its params.json, or the
reference defaults scaled to N) and diffusionx (edge preview, predicted strength, cloud refine) each make
one image per prompt with the same seeds; the judge scores them. Writes modes.json, modes.csv and modes.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from diffusionx.experiments.evaluation import (
    DEFAULT_BATCH_SIZE,
    EvalReport,
    evaluate_mode,
    load_pair,
)
from diffusionx.models.loading import ModelNotAvailableError
from diffusionx.shapes.data import heldout_prompts

COLUMNS = (
    "mode",
    "cloud_calls",
    "edge_calls",
    "approximated",
    "seconds_per_image",
    "quality",
    "exact",
    "settings",
)


def mode_fields(params: dict | None, steps: int | None) -> dict[str, dict[str, object]]:
    """Request fields per mode. With a search result, hybrid switches where the chosen ec-diff does."""
    if params is not None:
        steps = int(params["num_inference_steps"])
    ec_diff: dict[str, object] = {"num_inference_steps": steps}
    hybrid: dict[str, object] = {"num_inference_steps": steps}
    if params is not None:
        ec_diff.update(
            switch_step=params["switch_step"],
            warmup_steps=params["warmup_steps"],
            approx_interval=params["approx_interval"],
            smoothing=params["smoothing"],
        )
        hybrid["switch_step"] = params["switch_step"]
    return {
        "cloud": {"num_inference_steps": steps},
        "edge": {},
        "hybrid": hybrid,
        "ec-diff": ec_diff,
        "diffusionx": {"num_inference_steps": steps},
    }


def row(report: EvalReport) -> dict[str, object]:
    calls = report.unet_calls
    return {
        "mode": report.mode,
        "cloud_calls": round(calls["cloud"], 2),
        "edge_calls": round(calls["edge"], 2),
        "approximated": round(calls["approximated"], 2),
        "seconds_per_image": round(report.seconds_per_image, 4),
        "quality": round(report.quality, 4),
        "exact": round(report.exact, 4),
        "settings": json.dumps({k: v for k, v in report.settings.items() if v is not None}),
    }


def to_markdown(rows: Sequence[dict[str, object]]) -> str:
    lines = [
        "| mode | cloud UNet calls | edge UNet calls | approximated steps | seconds / image | quality "
        "| exact match |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['cloud_calls']} | {r['edge_calls']} | {r['approximated']} | "
            f"{r['seconds_per_image']} | {r['quality']} | {r['exact']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusionx compare", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="held-out prompts (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set seed; image i uses seed + i")
    parser.add_argument(
        "--steps", type=int, default=None, help="N for cloud/hybrid/ec-diff (default: cloud's)"
    )
    parser.add_argument("--params", type=Path, help="params.json written by `diffusionx search`")
    parser.add_argument("--cloud", default="shapes-cloud", help="cloud model (default shapes-cloud)")
    parser.add_argument("--edge", default="shapes-edge", help="edge model (default shapes-edge)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="requests per batch")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/compare"), help="output directory (default runs/compare/)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n={args.n} is not allowed: use an integer >= 1")
    params = json.loads(args.params.read_text()) if args.params else None
    try:
        cloud, edge = load_pair("hybrid", args.cloud, args.edge)
    except ModelNotAvailableError as error:
        print(f"diffusionx compare: error: {error}", file=sys.stderr)
        return 1
    prompts = heldout_prompts(args.n, seed=args.seed)
    rows = []
    for mode, fields in mode_fields(params, args.steps).items():
        report = evaluate_mode(
            mode,
            cloud,
            edge,
            prompts,
            seed=args.seed,
            batch_size=args.batch_size,
            request_fields=fields,
            progress=not args.no_progress,
        )
        rows.append(row(report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "modes.json").write_text(json.dumps({"n": args.n, "seed": args.seed, "rows": rows}, indent=2))
    with (args.out / "modes.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = to_markdown(rows)
    (args.out / "modes.md").write_text(f"{args.n} held-out prompts, seed {args.seed}\n\n{table}\n")
    print(table)
    print(f"wrote {args.out}/modes.json, modes.csv, modes.md")
    return 0
