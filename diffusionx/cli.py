"""The `diffusionx` command line. Each subcommand lives in its own module and is imported lazily.

Subcommands that start Ray live in `deployments/` and `clients/`, so the library itself never imports Ray.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from diffusionx import __version__

# subcommand -> (module with `main(argv)`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("clients.demo", "start the embedded application, run a multi-round session, write results"),
    "serve": ("deployments.serve_local", "serve an application on http://127.0.0.1:8000 until interrupted"),
    "loadgen": (
        "clients.loadgen",
        "replay a workload (sessions, finalizes, previews; Poisson, ramp or trace) against a server",
    ),
    "bench": (
        "clients.bench",
        "serving benchmarks: preview | refine | compare | autoscale | shed | faults | state-memory",
    ),
    "gpu-bench": (
        "diffusionx.experiments.gpu_bench",
        "per-tier step time, images/s, step batching, GPU memory (fp16), no server",
    ),
    "eval": ("diffusionx.experiments.evaluation", "quality and cost of a mode on the embedded shapes models"),
    "compare": (
        "diffusionx.experiments.compare",
        "every mode on the same prompts, in process: UNet calls, s, quality",
    ),
    "search": ("diffusionx.experiments.search", "EC-Diff two-stage greedy search of (p, k, a) then s"),
    "train-clip": (
        "diffusionx.shapes.train_clip",
        "train shapes-clip, the image-text alignment model the strength predictors read",
    ),
    "models": ("diffusionx.models.cli", "list the model registry"),
    "predictor": (
        "diffusionx.experiments.predictor.cli",
        "learned strength predictors: label | train | eval",
    ),
    "train-shapes": (
        "diffusionx.shapes.train",
        "train the embedded shapes models (VAE, text encoder, UNets)",
    ),
    "sample-shapes": (
        "diffusionx.shapes.sample",
        "sample the shapes models and score the images with the judge (accuracy per attribute)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionx",
        description="Interactive text-to-image serving: edge previews, cloud refinement, EC-Diff.",
        epilog="commands:\n"
        + "\n".join(f"  {name:<14} {text}" for name, (_, text) in SUBCOMMANDS.items())
        + "\n\n`diffusionx COMMAND --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"diffusionx {__version__}")
    parser.add_argument("command", choices=list(SUBCOMMANDS), metavar="COMMAND", help="what to run (below)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # transformers warns about optional image-processor backends nobody here uses; keep real errors
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    # only the first word is ours: the rest (its --help included) belongs to the subcommand
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
