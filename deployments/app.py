"""The application builder: `import_path: deployments.app:build_app` in a serve config, `args:` typed by
`diffusionx.app_config.AppArgs`. Composes SharedState, EdgePreviewer, StrengthPredictor, CloudRefiner and
the HTTP ingress into one application."""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from deployments.cloud import CloudRefiner
from deployments.edge import EdgePreviewer
from deployments.ingress import DiffusionXIngress
from deployments.predictor import StrengthPredictor
from deployments.state import SharedState
from diffusionx.app_config import AppArgs

SPECULATION_TTL_GRACE_S = 10.0


def deployment(decorated: object) -> Deployment:
    """A `@serve.deployment` class as what it is at run time (type checkers keep a decorated class's own
    type, so they would not see `bind`)."""
    if not isinstance(decorated, Deployment):
        raise TypeError(f"{decorated!r} is not a Ray Serve deployment")
    return decorated


def build_app(args: dict[str, Any] | None = None) -> Application:
    config = AppArgs(**(args or {}))
    state = deployment(SharedState).bind(
        config.preview_cache_bytes, config.preview_cache_ttl_s, config.speculation_ttl_s
    )
    edge = deployment(EdgePreviewer).bind(
        config.edge_model,
        state,
        device=config.device,
        max_batch_size=config.edge_max_batch_size,
        batch_wait_timeout_s=config.edge_batch_wait_timeout_s,
        torch_threads=config.torch_threads,
        edit_steps=config.edit_steps,
        prepare_edits=config.prepare_edits,
        idle_host=config.speculation_idle_host,
        nice=config.model_nice,
        edit_predictor=config.edit_predictor if config.edit_predictor_on == "edge" else None,
        alignment_model=config.alignment_model,
    )
    cloud = deployment(CloudRefiner).bind(
        config.cloud_model,
        state,
        device=config.device,
        max_batch_size=config.cloud_max_batch_size,
        batch_wait_timeout_s=config.cloud_batch_wait_timeout_s,
        torch_threads=config.torch_threads,
        nice=config.model_nice,
        step_batching=config.cloud_step_batching,
        step_order=config.cloud_step_order,
        # a replica keeps a speculation a little past the registry's TTL, so one the registry names
        # is still there when its claim arrives
        speculation_ttl_s=config.speculation_ttl_s + SPECULATION_TTL_GRACE_S,
        background_max_slowdown=config.speculation_max_slowdown,
        idle_host=config.speculation_idle_host,
    )
    predictor = deployment(StrengthPredictor).bind(
        state,
        max_batch_size=config.predictor_max_batch_size,
        batch_wait_timeout_s=config.predictor_batch_wait_timeout_s,
        refine_predictor=config.refine_predictor,
        edit_predictor=config.edit_predictor,
        alignment_model=config.alignment_model,
    )
    return deployment(DiffusionXIngress).bind(edge, predictor, cloud, state, config.model_dump())
