"""Prometheus metrics of the application, through `ray.serve.metrics` (exported with Ray's own metrics).

Ray exports every series with a `ray_` prefix and the tags `application`, `deployment` and `replica`; so
`diffusionx_queued_steps` is scraped as `ray_diffusionx_queued_steps{tier="cloud", replica=...}`. Sum over
replicas in PromQL. The library stays Ray-free: the tier replicas read the model loop's `work()` on every
change and hear its batches and jobs through a `LoopObserver`; the ingress records what it decides.

Tier replicas (tag `tier`; `kind` is the model-loop kind: preview, edit, finish, refine, generate, plan,
predict):
- `diffusionx_queued_requests`, `diffusionx_queued_steps`: work waiting for the model (gauges);
- `diffusionx_running_requests`, `diffusionx_running_steps`: work in the model (gauges; steps still to run);
- `diffusionx_batch_size_samples`: samples per model call (histogram, `kind`);
- `diffusionx_batched_step_seconds`: seconds per batched denoising step (histogram, `kind`);
- `diffusionx_queue_wait_seconds`, `diffusionx_model_seconds`: per request, waiting and running
  (histograms, `kind`);
- `diffusionx_tier_requests_total`: requests that ran, by `kind` and `outcome` (ok | error).

Ingress:
- `diffusionx_request_seconds`: end to end in the ingress, by `endpoint` and `route` (preview: edge or
  edit; refine: cloud | cloud-reduced | edge-fallback; generate: the mode) (histogram);
- `diffusionx_routes_total`: finalizes by `route` (counter);
- `diffusionx_strength_predicted_ratio`, `diffusionx_strength_used_ratio`: img2img strengths (histograms);
- `diffusionx_requests_shed_total`: requests answered 503 (overload), by `endpoint` (counter);
- `diffusionx_retries_total`: requests that are retries, by `endpoint` (counter; a client marks a retry
  with the `X-DiffusionX-Attempt` header, 2 for the first retry).

Edge replicas with `prepare_edits` (`diffusionx.engine.edit_preparation`):
- `diffusionx_edit_preparations_total`: answered images whose next edit was prepared, by `result`
  (`prepared` | `skipped`: the replica or host was not idle in time | `failed`) (counter);
- `diffusionx_edit_inputs_total`: edit inputs by `result` (`hit`: their latents were prepared | `miss`)
  (counter).

Speculative refinement (`diffusionx.policy.speculation`):
- `diffusionx_speculative_unet_calls_total`: UNet calls speculation ran in the background, by `outcome`
  (`used`: they answered a finalize; `wasted`: dropped, superseded or expired) (counter, cloud replicas);
- `diffusionx_speculations_total`: speculations by `result` (`hit` | `promoted` | `miss` | `superseded`
  | `expired`; a miss is a finalize that found none to use) (counter, the shared state, which sees them all).
"""

from __future__ import annotations

import functools

from ray.serve.metrics import Counter, Gauge, Histogram

from diffusionx.engine.model_loop import LoopObserver, LoopWork

SECONDS_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
BATCH_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
# (the `type: ignore[arg-type]` on tag_keys below: ray.util.metrics annotates tag_keys as a 1-tuple,
# Tuple[str], though it takes any number of keys)
STRENGTH_BOUNDARIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
RETRY_HEADER = "x-diffusionx-attempt"


class TierMetrics(LoopObserver):
    """The metrics of one tier replica: load gauges set from `ModelLoop.work()`, batch and job events."""

    def __init__(self, tier: str) -> None:
        self.tier = tier

        def gauge(name: str, description: str) -> Gauge:
            metric = Gauge(name, description=description, tag_keys=("tier",))
            metric.set_default_tags({"tier": tier})  # a fresh dict: Serve adds its own tags to it
            return metric

        def histogram(name: str, description: str, boundaries: list[float]) -> Histogram:
            metric = Histogram(
                name,
                description=description,
                boundaries=boundaries,
                tag_keys=("tier", "kind"),  # type: ignore[arg-type]
            )
            metric.set_default_tags({"tier": tier})
            return metric

        self.queued_requests = gauge("diffusionx_queued_requests", "Requests waiting for the model.")
        self.queued_steps = gauge("diffusionx_queued_steps", "Denoising steps of requests waiting.")
        self.running_requests = gauge("diffusionx_running_requests", "Requests the model is running.")
        self.running_steps = gauge("diffusionx_running_steps", "Denoising steps left of running requests.")
        self.batch_size = histogram(
            "diffusionx_batch_size_samples", "Samples per model call.", BATCH_BOUNDARIES
        )
        self.step_seconds = histogram(
            "diffusionx_batched_step_seconds", "Seconds per batched denoising step.", SECONDS_BOUNDARIES
        )
        self.queue_wait = histogram(
            "diffusionx_queue_wait_seconds", "Seconds a request waited for the model.", SECONDS_BOUNDARIES
        )
        self.model_time = histogram(
            "diffusionx_model_seconds", "Seconds the model worked on a request.", SECONDS_BOUNDARIES
        )
        self.requests = Counter(
            "diffusionx_tier_requests_total",
            description="Requests that ran on the tier, by outcome.",
            tag_keys=("tier", "kind", "outcome"),  # type: ignore[arg-type]
        )
        self.requests.set_default_tags({"tier": tier})

    def update(self, work: LoopWork) -> None:
        self.queued_requests.set(work.queued_requests)
        self.queued_steps.set(work.queued_steps)
        self.running_requests.set(work.running_requests)
        self.running_steps.set(work.running_steps)

    def batch_ran(self, kind: str, batch_size: int, steps: int, elapsed_s: float) -> None:
        tags = {"kind": kind}
        self.batch_size.observe(batch_size, tags=tags)
        if steps > 0:
            self.step_seconds.observe(elapsed_s / steps, tags=tags)

    def job_finished(self, kind: str, queue_s: float, run_s: float, ok: bool) -> None:
        tags = {"kind": kind}
        self.queue_wait.observe(queue_s, tags=tags)
        self.model_time.observe(run_s, tags=tags)
        self.requests.inc(tags={"kind": kind, "outcome": "ok" if ok else "error"})


class IngressMetrics:
    """What the ingress decides and how long requests take end to end."""

    def __init__(self) -> None:
        self.request_seconds = Histogram(
            "diffusionx_request_seconds",
            description="Seconds from request to response in the ingress, by endpoint and route.",
            boundaries=SECONDS_BOUNDARIES,
            tag_keys=("endpoint", "route"),  # type: ignore[arg-type]
        )
        self.routes = Counter(
            "diffusionx_routes_total", description="Finalizes by route taken.", tag_keys=("route",)
        )
        self.strength_predicted = Histogram(
            "diffusionx_strength_predicted_ratio",
            description="Strength the predictor asked for.",
            boundaries=STRENGTH_BOUNDARIES,
        )
        self.strength_used = Histogram(
            "diffusionx_strength_used_ratio",
            description="Strength the router used.",
            boundaries=STRENGTH_BOUNDARIES,
        )
        self.shed = Counter(
            "diffusionx_requests_shed_total",
            description="Requests refused with 503 (overload).",
            tag_keys=("endpoint",),
        )
        self.retries = Counter(
            "diffusionx_retries_total",
            description="Requests that a client marked as a retry.",
            tag_keys=("endpoint",),
        )

    def request_done(self, endpoint: str, route: str, seconds: float) -> None:
        self.request_seconds.observe(seconds, tags={"endpoint": endpoint, "route": route})

    def routed(self, route: str, strength_predicted: float | None, strength_used: float) -> None:
        self.routes.inc(tags={"route": route})
        if strength_predicted is not None:
            self.strength_predicted.observe(strength_predicted)
        self.strength_used.observe(strength_used)

    def request_shed(self, endpoint: str) -> None:
        self.shed.inc(tags={"endpoint": endpoint})

    def request_seen(self, endpoint: str, attempt_header: str | None) -> None:
        """Counts a retry when the client's attempt header says this is not the first attempt."""
        if attempt_header is not None and attempt_header.strip().isdigit() and int(attempt_header) > 1:
            self.retries.inc(tags={"endpoint": endpoint})


@functools.cache
def ingress_metrics() -> IngressMetrics:
    """The ingress process's metrics (created once per process, on first use inside the replica)."""
    return IngressMetrics()


def metrics_url() -> str | None:
    """Where Prometheus scrapes this node's Ray metrics (ours included), from Ray's node table: the
    node's metrics export port (`ray.init(_metrics_export_port=...)`; `diffusionx serve` fixes it)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


class SpeculationMetrics:
    """Speculative refinement: UNet calls by outcome (cloud replicas) and speculations by result (state)."""

    def __init__(self) -> None:
        self.unet_calls = Counter(
            "diffusionx_speculative_unet_calls_total",
            description="UNet calls run as speculative background work, by outcome (used | wasted).",
            tag_keys=("outcome",),
        )
        self.results = Counter(
            "diffusionx_speculations_total",
            description="Speculations by result (hit | promoted | miss | superseded | expired).",
            tag_keys=("result",),
        )

    def unet_calls_spent(self, outcome: str, calls: int) -> None:
        self.unet_calls.inc(calls, tags={"outcome": outcome})

    def counted(self, before: dict[str, int], after: dict[str, int]) -> None:
        """Adds what a registry's counts grew by."""
        for result, count in after.items():
            if count > before.get(result, 0):
                self.results.inc(count - before.get(result, 0), tags={"result": result})


class EditPreparationMetrics:
    """The edge's preparation of next edits (`diffusionx.engine.edit_preparation`)."""

    def __init__(self) -> None:
        self.results = Counter(
            "diffusionx_edit_preparations_total",
            description="Answered images whose next edit the edge prepared while idle, by result (prepared "
            "| skipped: not idle in time | failed).",
            tag_keys=("result",),
        )
        self.inputs = Counter(
            "diffusionx_edit_inputs_total",
            description="Edit inputs by whether their latents were prepared (hit | miss).",
            tag_keys=("result",),
        )

    def result(self, result: str) -> None:
        self.results.inc(1, tags={"result": result})

    def lookup(self, hits: int, misses: int) -> None:
        for result, count in (("hit", hits), ("miss", misses)):
            if count:
                self.inputs.inc(count, tags={"result": result})


@functools.cache
def edit_preparation_metrics() -> EditPreparationMetrics:
    return EditPreparationMetrics()


@functools.cache
def speculation_metrics() -> SpeculationMetrics:
    return SpeculationMetrics()
