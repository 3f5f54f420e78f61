"""`diffusionx models`: print the registry."""

from __future__ import annotations

import argparse

from diffusionx.models.registry import REGISTRY


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="diffusionx models", description="List the model registry.").parse_args(argv)
    for spec in REGISTRY.values():
        source = spec.source or "(built on first use)"
        print(f"{spec.name:<17} {spec.tier:<6} {spec.family:<12} {source}\n{'':<17} {spec.description}")
    return 0
