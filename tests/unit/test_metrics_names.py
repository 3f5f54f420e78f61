"""The metric names: diffusionx_* with units in the names, documented, and the Grafana dashboard that
ships in deploy/grafana/ asks only for series the application exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import deployments.metrics as metrics
from deployments.metrics import EditPreparationMetrics, IngressMetrics, SpeculationMetrics, TierMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "diffusionx.json"


def exported_names() -> set[str]:
    objects = [
        *vars(TierMetrics("edge")).values(),
        *vars(IngressMetrics()).values(),
        *vars(SpeculationMetrics()).values(),
        *vars(EditPreparationMetrics()).values(),
    ]
    return {obj._name for obj in objects if hasattr(obj, "_name")}


def test_names_are_prefixed_documented_and_carry_units():
    names = exported_names()
    assert len(names) == 19
    for name in names:
        assert name.startswith("diffusionx_"), name
        assert name.endswith(("_seconds", "_samples", "_ratio", "_total", "_requests", "_steps")), name
        assert f"`{name}`" in metrics.__doc__, f"{name} is not in the module's list"


def test_the_grafana_dashboard_uses_only_exported_series():
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"ray_(diffusionx_\w+)", target["expr"]))
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert used and used <= exported_names(), used - exported_names()
    assert {"diffusionx_queued_steps", "diffusionx_routes_total", "diffusionx_request_seconds"} <= used
