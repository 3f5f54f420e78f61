"""`diffusionx predictor label | train | eval`: dispatches to the subcommand's module."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "label": "diffusionx.experiments.predictor.label",
    "train": "diffusionx.experiments.predictor.train",
    "eval": "diffusionx.experiments.predictor.evaluate",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(
            f"usage: diffusionx predictor {{{','.join(SUBCOMMANDS)}}} [options]  (--help for each)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]) or 0)
