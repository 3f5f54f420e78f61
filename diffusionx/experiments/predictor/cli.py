"""`diffusionx predictor label | train | eval`: dispatches to the subcommand's module, which parses its own
options (`diffusionx predictor label --help`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with `main(argv)`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "label": (
        "diffusionx.experiments.predictor.label",
        "run shapes sessions in process and label each edit and finalize with the smallest enough strength",
    ),
    "train": (
        "diffusionx.experiments.predictor.train",
        "train the refine and edit strength predictors on the labels",
    ),
    "eval": (
        "diffusionx.experiments.predictor.evaluate",
        "learned predictors against the heuristic and fixed strengths on held-out sessions (Pareto plot)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionx predictor",
        description="Learned strength predictors: label sessions, train on the labels, evaluate.",
        epilog="`diffusionx predictor COMMAND --help` shows a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to run")
    for name, (_, text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # parsed by its module (`main`)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return int(importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:]) or 0)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    parser.parse_args(argv)  # --help, or a usage error naming the commands
    return 2
