"""Every shipped serve config validates against Ray's own schema and builds the application."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import build_app
from deployments.cloud import CloudRefiner
from deployments.edge import EdgePreviewer
from deployments.ingress import DiffusionXIngress
from deployments.predictor import StrengthPredictor
from deployments.state import SharedState
from diffusionx.app_config import SERVE_REPLICA_ENV, AppArgs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [
    *sorted(ROOT.glob("serve_config*.yaml")),
    ROOT / "tests" / "integration" / "serve_config_test.yaml",
]
DEPLOYMENTS = {"DiffusionXIngress", "EdgePreviewer", "CloudRefiner", "StrengthPredictor", "SharedState"}


def test_both_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"serve_config.yaml", "serve_config_cpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_builds(path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    [app] = schema.applications
    assert app.import_path == "deployments.app:build_app"
    args = AppArgs(**app.args)
    application = build_app(app.args)
    assert type(application).__name__ == "Application"
    assert {d.name for d in app.deployments} <= DEPLOYMENTS
    for deployment in app.deployments:
        if deployment.name in ("EdgePreviewer", "CloudRefiner"):
            assert deployment.autoscaling_config is not None, f"{deployment.name} must autoscale"
    assert args.edge_model and args.cloud_model


def test_production_config_puts_cloud_on_whole_gpus_and_edge_on_a_fraction():
    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    [app] = schema.applications
    options = {d.name: d.ray_actor_options.model_dump() for d in app.deployments}
    assert app.args["cloud_model"] == "sd15" and app.args["edge_model"] == "tiny-sd"
    assert (
        options["CloudRefiner"]["num_gpus"] >= 1 and float(options["CloudRefiner"]["num_gpus"]).is_integer()
    )
    assert 0 < options["EdgePreviewer"]["num_gpus"] < 1


def test_cpu_config_runs_the_embedded_models_without_gpus():
    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config_cpu.yaml").read_text()))
    [app] = schema.applications
    assert app.args["edge_model"] == "shapes-edge" and app.args["cloud_model"] == "shapes-cloud"
    assert all(not d.ray_actor_options.model_dump().get("num_gpus") for d in app.deployments)


def test_bad_app_args_are_refused_with_the_field_name():
    with pytest.raises(ValueError, match="edge_max_batch_size"):
        AppArgs(edge_max_batch_size=0)
    with pytest.raises(ValueError, match="Extra inputs"):
        AppArgs(edge_modle="x")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ingress_never_queues_in_serve_so_every_503_carries_retry_after(path):
    """Serve's own 503 (its queue in front of a deployment is full) has no Retry-After: in front of the
    ingress that queue must be unbounded, so overload is always answered by admission control."""
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    [app] = schema.applications
    [ingress] = [d for d in app.deployments if d.name == "DiffusionXIngress"]
    fields = ingress.model_dump(exclude_unset=True)
    assert fields.get("max_queued_requests") == -1, f"{path.name}: ingress max_queued_requests"
    assert fields.get("max_ongoing_requests", 0) >= 1024, f"{path.name}: ingress max_ongoing_requests"


def serve_configs() -> list[tuple[str, dict]]:
    """(name, Serve config) of every shipped config, the test app's and the KubeRay manifest's."""
    configs = [(path.name, yaml.safe_load(path.read_text())) for path in CONFIGS]
    manifest = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    return [*configs, ("rayservice.yaml", yaml.safe_load(manifest["spec"]["serveConfigV2"]))]


@pytest.mark.parametrize(("name", "config"), serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_config_runs_serves_low_overhead_path_on_its_replicas(name, config):
    [app] = config["applications"]
    assert app["runtime_env"]["env_vars"] == SERVE_REPLICA_ENV, name


@pytest.mark.parametrize(("name", "config"), serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_deployment_option_is_set_in_the_decorator_or_the_configs_not_both(name, config):
    """One place for each default: an option a config sets is not also a number in the decorator."""
    decorated = {
        deployment.name: deployment._deployment_config.user_configured_option_names - {"name"}
        for deployment in (CloudRefiner, DiffusionXIngress, EdgePreviewer, SharedState, StrengthPredictor)
    }
    [app] = config["applications"]
    for deployment in app["deployments"]:
        both = decorated[deployment["name"]] & set(deployment)
        assert not both, f"{name}: {deployment['name']} sets {sorted(both)} in its decorator and the config"
