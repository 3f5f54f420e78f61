"""The `diffusionx` command line. Each subcommand lives in its own module and is imported lazily.

Subcommands that start Ray live in `deployments/` and `clients/`, so the library itself never imports Ray.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module with `main(argv)`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("clients.demo", "start the embedded application, run a multi-round session, write results"),
    "serve": ("deployments.serve_local", "serve an application on http://127.0.0.1:8000 until interrupted"),
    "eval": ("diffusionx.experiments.evaluation", "quality and cost of a mode on the embedded shapes models"),
    "search": ("diffusionx.experiments.search", "EC-Diff two-stage greedy search of (p, k, a) then s"),
    "compare": (
        "diffusionx.experiments.compare",
        "every mode on the same prompts: UNet calls, s, quality",
    ),
    "train-shapes": (
        "diffusionx.shapes.train",
        "train the embedded shapes models (VAE, text encoder, UNets)",
    ),
    "train-clip": (
        "diffusionx.shapes.train_clip",
        "train shapes-clip, the image-text alignment model the strength predictors read",
    ),
    "bench": ("clients.bench", "serving benchmarks against a local application"),
    "loadgen": (
        "clients.loadgen",
        "replay a workload (sessions, finalizes, previews) against a server, as CSV",
    ),
    "models": ("diffusionx.models.cli", "list the model registry"),
    "predictor": (
        "diffusionx.experiments.predictor.cli",
        "learned strength predictors: label | train | eval",
    ),
    "gpu-bench": (
        "diffusionx.experiments.gpu_bench",
        "per-tier step time, images/s, step batching, GPU memory (fp16)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # transformers warns about optional image-processor backends nobody here uses; keep real errors
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(
        prog="diffusionx",
        description="Interactive text-to-image serving: edge previews, cloud refinement, EC-Diff.",
    )
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="what to run")
    parser.epilog = "\n".join(f"  {name:<13} {text}" for name, (_, text) in SUBCOMMANDS.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
