"""The KubeRay RayService manifest embeds the production application and gives each tier its own GPU
node group with the tier resource its replicas ask for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
TIERS = {"cloud": ("CloudRefiner", "cloud_node"), "edge": ("EdgePreviewer", "edge_node")}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def serve_config(manifest) -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))


def groups(manifest: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def test_manifest_is_a_rayservice_whose_serve_config_is_the_production_one(manifest, serve_config):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    production = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    assert serve_config.model_dump() == production.model_dump()
    [app] = serve_config.applications
    assert app.import_path == "deployments.app:build_app"
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("group_name", sorted(TIERS))
def test_each_tier_has_a_gpu_group_with_its_tier_resource(manifest, serve_config, group_name):
    deployment_name, resource = TIERS[group_name]
    group = groups(manifest)[group_name]
    pod = group["template"]["spec"]
    assert pod["nodeSelector"]["nvidia.com/gpu.product"], "a GPU node selector pins the group to its GPUs"
    [container] = pod["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    cpus = float(container["resources"]["limits"]["cpu"])
    declared = json.loads(json.loads(group["rayStartParams"]["resources"]))
    assert declared == {resource: gpus}  # one tier slot per GPU, nothing of the other tier

    [app] = serve_config.applications
    deployment = next(d for d in app.deployments if d.name == deployment_name)
    options = deployment.ray_actor_options.model_dump()
    # a replica asks for as much of the tier resource as of a GPU, so it fits only this group's pods
    assert options["resources"] == {resource: options["num_gpus"]}
    per_pod = round(gpus / options["num_gpus"])
    assert per_pod * options["num_cpus"] <= cpus, "the pod's CPUs hold as many replicas as its GPUs"
    assert group["maxReplicas"] * per_pod >= deployment.autoscaling_config["max_replicas"]
    other = next(r for g, (_, r) in TIERS.items() if g != group_name)
    assert other not in options["resources"]


def test_every_pod_runs_serve_with_the_low_overhead_env_of_the_local_app(manifest):
    from diffusionx.app_config import SERVE_FAST_PATH_ENV

    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        [container] = pod["template"]["spec"]["containers"]
        assert {e["name"]: e["value"] for e in container["env"]} == SERVE_FAST_PATH_ENV
