"""The work-based autoscaling policy, with Serve's own AutoscalingContext built by hand (no cluster) and an
injected clock for the delays Serve applies around custom policies."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import autoscaling_policy as serve_policy
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from ray.serve.schema import ServeDeploySchema

from diffusionx.engine.monitor import TierMonitor
from diffusionx.policy.autoscaling import (
    BATCHED_STEP_S,
    FULL_BATCH_STEP_S,
    MAX_BATCH_SIZE,
    QUEUED_BATCHED_STEPS,
    STEPS_PER_REQUEST,
    QueuedStepsPolicy,
    autoscaling_stats,
    batched_steps,
)

ROOT = Path(__file__).resolve().parents[2]
POLICY_PATH = "diffusionx.policy.autoscaling:QueuedStepsPolicy"
DEPLOYMENT = DeploymentID(name="CloudRefiner", app_name="diffusionx")


def config(**overrides) -> AutoscalingConfig:
    options = {
        "min_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 60.0,
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {"target_wait_s": 4.0}},
    }
    return AutoscalingConfig(**{**options, **overrides})


def context(
    replicas: dict[str, dict[str, float]],
    current: int | None = None,
    queued_at_handles: float = 0.0,
    ongoing: float | None = None,
    cfg: AutoscalingConfig | None = None,
    policy_state: dict | None = None,
) -> AutoscalingContext:
    """A context as Serve's controller builds it: `replicas` maps a replica name to its reported metrics."""
    ids = {name: ReplicaID(unique_id=name, deployment_id=DEPLOYMENT) for name in replicas}
    metrics: dict[str, dict[ReplicaID, float]] = {}
    for name, reported in replicas.items():
        for key, value in reported.items():
            metrics.setdefault(key, {})[ids[name]] = value
    n = len(replicas) if current is None else current
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name=DEPLOYMENT.app_name,
        current_num_replicas=n,
        target_num_replicas=n,
        running_replicas=list(ids.values()),
        total_num_requests=ongoing if ongoing is not None else 0.0,
        total_queued_requests=queued_at_handles,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state=policy_state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=0.0,
        config=cfg or config(),
    )


def replica(requests: int, steps_each: int, step_s: float = 0.1, batch: int = 8) -> dict[str, float]:
    monitor = TierMonitor()
    monitor.max_batch_size = batch
    for _ in range(requests):
        monitor.enqueue(steps_each)
    if step_s > 0:
        monitor.step_time.seed([(1, step_s)])  # a constant step time (0: not measured)
    return autoscaling_stats(monitor.snapshot().to_dict())


def test_batched_steps_counts_model_calls_not_request_steps():
    assert batched_steps(8 * 40, 8, 8) == 40  # eight 40-step refinements share 40 UNet calls
    assert batched_steps(8 * 2, 8, 8) == 2
    assert batched_steps(16 * 10, 16, 8) == 20  # two full batches in a row
    assert batched_steps(3 * 10, 3, 8) == 10  # a part-full batch still takes every step
    assert batched_steps(0, 0, 8) == 0.0
    with pytest.raises(ValueError, match="max_batch_size=0"):
        batched_steps(10, 1, 0)


def test_replica_stats_come_from_the_monitor_snapshot():
    stats = replica(requests=4, steps_each=30, step_s=0.2, batch=8)
    assert stats == {
        QUEUED_BATCHED_STEPS: 30.0,
        BATCHED_STEP_S: 0.2,
        STEPS_PER_REQUEST: 30.0,
        MAX_BATCH_SIZE: 8.0,
        FULL_BATCH_STEP_S: 0.2,
    }
    idle = autoscaling_stats(TierMonitor().snapshot().to_dict())
    assert idle[QUEUED_BATCHED_STEPS] == 0.0 and idle[BATCHED_STEP_S] == 0.0  # not measured yet


def test_replica_step_time_is_the_fitted_t_of_b_at_the_batch_its_work_runs_in():
    monitor = TierMonitor()
    monitor.max_batch_size = 8
    monitor.step_time.seed([(1, 0.10), (8, 0.24)])  # t(b) = 0.08 + 0.02 b
    for _ in range(3):
        monitor.enqueue(10)
    stats = autoscaling_stats(monitor.snapshot().to_dict())
    assert stats[BATCHED_STEP_S] == pytest.approx(0.14) and stats[FULL_BATCH_STEP_S] == pytest.approx(0.24)
    for _ in range(20):
        monitor.enqueue(10)
    assert autoscaling_stats(monitor.snapshot().to_dict())[BATCHED_STEP_S] == pytest.approx(0.24)


def test_policy_scales_on_steps_where_the_default_sees_equal_request_counts():
    """Eight short and eight long refinements per replica: the same ongoing requests, 20x the work."""
    policy = QueuedStepsPolicy(target_wait_s=4.0)
    short = context({"a": replica(8, 2), "b": replica(8, 2)}, ongoing=16)
    long = context({"a": replica(8, 40), "b": replica(8, 40)}, ongoing=16)
    # Serve's default: 16 ongoing requests at target 8 per replica -> 2 replicas, both times
    assert replica_queue_length_autoscaling_policy(short)[0] == pytest.approx(2.0)
    assert replica_queue_length_autoscaling_policy(long)[0] == pytest.approx(2.0)
    # work: 2 replicas x 2 batched steps x 0.1 s = 0.4 s -> 0.1 replica; 2 x 40 x 0.1 s = 8 s -> 2 replicas
    assert policy(short)[0] == pytest.approx(0.1)
    desired, state = policy(long)
    assert desired == pytest.approx(2.0) and state["work_s"] == pytest.approx(8.0)


def test_requests_waiting_at_the_handles_count_as_full_batches():
    policy = QueuedStepsPolicy(target_wait_s=4.0)
    ctx = context({"a": replica(8, 20, step_s=0.1)}, queued_at_handles=16)
    # held 20 batched steps (2 s) + 16 waiting x 20 steps / 8 per batch = 40 batched steps (4 s)
    desired, state = policy(ctx)
    assert desired == pytest.approx(6.0 / 4.0)
    assert state["waiting_requests"] == 16


def test_a_replica_without_a_measured_step_is_costed_at_the_tier_mean_or_the_default():
    policy = QueuedStepsPolicy(target_wait_s=1.0, default_step_s=0.5)
    fresh = replica(4, 10, step_s=0.0)
    assert policy(context({"a": replica(4, 10, step_s=0.2), "b": fresh}))[0] == pytest.approx(4.0)
    assert policy(context({"b": fresh}))[0] == pytest.approx(5.0)  # 10 batched steps x 0.5 s


def test_no_reports_yet_holds_the_current_target():
    ctx = context({}, current=3)
    assert QueuedStepsPolicy()(ctx) == (3, {})


@pytest.mark.parametrize("kwargs", [{"target_wait_s": 0}, {"default_step_s": -1.0}, {"target_wait_s": "5"}])
def test_bad_policy_kwargs_name_the_field(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        QueuedStepsPolicy(**kwargs)


def test_serve_applies_the_delays_around_the_policy(monkeypatch):
    """Through the wrapper Serve's controller puts around a custom policy: upscale only after
    upscale_delay_s of wanting it, downscale only after downscale_delay_s, one step of the clock at a time."""
    clock = {"now": 1000.0}
    monkeypatch.setattr(serve_policy.time, "time", lambda: clock["now"])
    cfg = config()
    policy = serve_policy._apply_autoscaling_config(_resolve_policy_callable(cfg.policy))
    busy = {"a": replica(8, 40), "b": replica(8, 40), "c": replica(8, 40)}  # 12 s of work -> 3 replicas
    state: dict = {}
    decisions = []
    for _ in range(3):  # t = 1000, 1005, 1010
        decision, state = policy(context(busy, current=1, cfg=cfg, policy_state=state))
        decisions.append(decision)
        clock["now"] += 5.0
    assert decisions == [1, 1, 3]
    idle = {"a": replica(0, 0), "b": replica(0, 0), "c": replica(0, 0)}
    decisions = []
    for _ in range(13):  # 60 s of an idle tier at 5 s ticks
        decision, state = policy(context(idle, current=3, cfg=cfg, policy_state=state))
        decisions.append(decision)
        clock["now"] += 5.0
    assert decisions[:12] == [3] * 12 and decisions[12] == 1


def test_shipped_configs_put_the_cloud_tier_on_the_work_policy():
    for name in ("serve_config.yaml", "serve_config_autoscale.yaml"):
        schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / name).read_text()))
        [app] = schema.applications
        cloud = next(d for d in app.deployments if d.name == "CloudRefiner")
        autoscaling = AutoscalingConfig(**cloud.autoscaling_config)
        assert autoscaling.policy.policy_function == POLICY_PATH, name
        policy = _resolve_policy_callable(autoscaling.policy)
        assert isinstance(policy, QueuedStepsPolicy)
        assert 0 < autoscaling.upscale_delay_s < autoscaling.downscale_delay_s, name
