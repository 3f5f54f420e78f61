"""The autoscaling bench's ramp, timeline and figures, from hand-made samples and request rows (no cluster);
the fake node types carry the tier resources the autoscaling config asks for."""

from __future__ import annotations

import pytest
import yaml

from clients.bench_autoscale import (
    Ramp,
    ahead_horizon_s,
    back_at_start,
    build_timeline,
    cloud_autoscaling,
    edge_autoscaling,
    edge_replicas_for,
    edge_step,
    replica_start_s,
    session_priors,
    slo_attainment,
    summarize,
    time_to_capacity,
)
from deployments.autoscaling_cluster import NODE_TYPES, LocalAutoscalingCluster
from deployments.local import AUTOSCALE_CONFIG

RAMP = Ramp(peak_rate=2.0, up_s=20.0, hold_s=20.0, down_s=20.0)


def sample(t: float, cloud: int, nodes: int, queued: int = 0) -> dict:
    return {"t_s": t, "replicas": {"edge": 1, "cloud": cloud, "predictor": 1}, "nodes": nodes,
            "queued_steps": queued}  # fmt: skip


def row(arrival_s: float, kind: str, e2e_ms: float, status: int | str = 200) -> dict:
    return {"arrival_s": arrival_s, "kind": kind, "status": status, "e2e_ms": e2e_ms}


def test_ramp_rises_holds_and_falls():
    arrivals = Ramp(peak_rate=5.0, up_s=40.0, hold_s=40.0, down_s=40.0).arrivals(seed=1)
    counts = [sum(1 for t in arrivals if 20 * i <= t < 20 * (i + 1)) for i in range(6)]
    # expected 25, 75, 100, 100, 75, 25 sessions per 20 s
    assert counts[0] < counts[1] < counts[2] and counts[3] > counts[4] > counts[5]
    assert abs(counts[2] - 100) < 35 and abs(counts[3] - 100) < 35
    assert arrivals == sorted(arrivals) and arrivals[-1] < 120.0
    assert arrivals == Ramp(5.0, 40.0, 40.0, 40.0).arrivals(seed=1)  # deterministic in the seed


def test_timeline_has_the_issue_fields_rates_and_windowed_p95():
    rows = [row(1.0 + 0.5 * i, "preview", 100.0) for i in range(10)]  # 10 requests in (0, 6]
    rows += [row(2.0, "finalize", 2000.0), row(3.0, "finalize", 4000.0), row(4.0, "finalize", 1, 503)]
    timeline = build_timeline([sample(5.0, 1, 3, 40), sample(10.0, 2, 4, 80)], rows, window_s=5.0)
    assert set(timeline[0]) == {
        "t_s", "offered_rps", "replicas", "asked", "nodes", "queued_steps", "finalize_latency_s_p95"
    }  # fmt: skip
    assert set(timeline[0]["replicas"]) == {"edge", "cloud", "predictor"}
    # (0, 5]: previews at 1.0 ... 5.0 (9) and the three finalizes: 12 in 5 s
    assert timeline[0]["offered_rps"] == pytest.approx(12 / 5)
    assert timeline[0]["finalize_latency_s_p95"] == pytest.approx(2.0)  # ended at 4.0; the 7.0 not yet
    assert timeline[1]["finalize_latency_s_p95"] == pytest.approx(4.0)  # the 503 never counts
    assert timeline[1]["queued_steps"] == 80 and timeline[1]["nodes"] == 4


def test_summary_figures_up_down_and_replica_seconds():
    clouds = [1, 1, 2, 3, 4, 4, 4, 4, 3, 2, 1, 1]  # samples every 5 s, load falls from t = 40
    nodes = [3, 3, 4, 4, 5, 5, 5, 5, 5, 4, 3, 3]
    samples = [sample(5.0 * i, c, n) for i, (c, n) in enumerate(zip(clouds, nodes, strict=True))]
    rows = [row(1.0, "finalize", 1000.0 * (i + 1)) for i in range(20)]
    summary = summarize(build_timeline(samples, rows, window_s=5.0), rows, RAMP)
    assert summary["cloud_replicas"] == {"min": 1, "max": 4, "end": 1}
    assert summary["nodes"] == {"min": 3, "max": 5, "end": 3}
    assert summary["scale_up_s"] == {"first_cloud_replica": 10.0, "cloud_at_peak": 20.0}
    assert summary["scale_down_s"] == {"cloud_back_to_min": 10.0, "nodes_back_to_min": 10.0}
    assert summary["cloud_replica_s"] == pytest.approx(5.0 * sum(clouds[:-1]))
    assert summary["finalize_latency_s"]["p95"] == pytest.approx(19.05)
    assert summary["errors"] == 0


def test_a_tier_that_never_scaled_has_no_scale_times():
    samples = [sample(5.0 * i, 1, 3) for i in range(4)]
    summary = summarize(build_timeline(samples, [], window_s=5.0), [], RAMP)
    assert summary["scale_down_s"] == {"cloud_back_to_min": None, "nodes_back_to_min": None}
    assert summary["scale_up_s"]["first_cloud_replica"] is None


def test_policy_variants_differ_in_the_policy_and_ahead_in_its_downscale_delay():
    work, default, ahead = cloud_autoscaling("work"), cloud_autoscaling("default"), cloud_autoscaling("ahead")
    assert work["policy"]["policy_function"].endswith(":QueuedStepsPolicy")
    assert "policy" not in default
    assert ahead["policy"]["policy_function"] == "diffusionx.policy.ahead:AheadPolicy"
    # the ahead policy keeps the work policy's kwargs (its reactive term) and adds its own
    assert work["policy"]["policy_kwargs"].items() <= ahead["policy"]["policy_kwargs"].items()
    assert {k: v for k, v in work.items() if k != "policy"} == default
    # the forecast holds replicas through the horizon, so ahead's downscale delay covers noise only
    assert ahead["downscale_delay_s"] == ahead["upscale_delay_s"] < default["downscale_delay_s"]

    def rest(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in ("policy", "downscale_delay_s")}

    assert rest(ahead) == rest(default)


def test_slo_attainment_counts_refused_finalizes_as_misses_and_ignores_previews():
    rows = [row(1.0, "finalize", 900.0), row(2.0, "finalize", 1100.0), row(3.0, "finalize", 10.0, 503)]
    rows += [row(1.0, "preview", 5000.0)]
    assert slo_attainment(rows, slo_s=1.0) == pytest.approx(1 / 3, abs=1e-4)
    assert slo_attainment(rows, slo_s=2.0) == pytest.approx(2 / 3, abs=1e-4)
    assert slo_attainment([row(1.0, "preview", 1.0)], 1.0) is None


def test_time_to_capacity_is_the_first_sample_with_the_needed_replicas():
    samples = [sample(5.0 * i, c, 3) for i, c in enumerate([1, 1, 2, 3, 2, 3])]
    timeline = build_timeline(samples, [], window_s=5.0)
    assert time_to_capacity(timeline, 3) == 15.0 and time_to_capacity(timeline, 4) is None
    summary = summarize(timeline, [row(1.0, "finalize", 500.0)], RAMP, slo_s=1.0, needed_cloud=2)
    assert summary["time_to_capacity_s"] == 10.0 and summary["slo_attainment"] == 1.0


def test_node_types_carry_the_tier_resources_the_config_asks_for():
    raw = yaml.safe_load(AUTOSCALE_CONFIG.read_text())
    deployments = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    for tier, name in (("cloud", "CloudRefiner"), ("edge", "EdgePreviewer")):
        options = deployments[name]["ray_actor_options"]
        node = NODE_TYPES[tier]["resources"]
        [(resource, need)] = options["resources"].items()
        per_node = int(min(node[resource] / need, node["CPU"] / options["num_cpus"]))
        assert per_node >= 1, tier
        if tier == "cloud":  # one GPU per cloud node: cloud nodes follow cloud replicas
            assert per_node == 1
        other = "edge_node" if tier == "cloud" else "cloud_node"
        assert other not in node
        assert (
            per_node * NODE_TYPES[tier]["max_workers"]
            >= deployments[name]["autoscaling_config"]["max_replicas"]
        ), f"{tier}: the node types must hold max_replicas"
    config = LocalAutoscalingCluster({"CPU": 2}, NODE_TYPES)._config
    assert config["provider"]["type"] == "fake_multinode"
    assert set(config["available_node_types"]) == {"cloud", "edge", "ray.head.default"}
    delayed = LocalAutoscalingCluster({"CPU": 2}, NODE_TYPES, node_start_delay_s=20.0)._config["provider"]
    assert delayed["type"] == "external" and delayed["node_start_delay_s"] == 20.0
    assert delayed["module"] == "deployments.delayed_node_provider.DelayedFakeProvider"


def test_the_delayed_provider_waits_before_it_creates_a_node(monkeypatch):
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

    from deployments import delayed_node_provider

    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    events: list = []
    monkeypatch.setattr(delayed_node_provider.time, "sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(FakeMultiNodeProvider, "create_node_with_resources_and_labels",
                        lambda self, *a: events.append(("create", a[2])))  # fmt: skip
    provider = delayed_node_provider.DelayedFakeProvider({"node_start_delay_s": 12.0}, "test")
    provider.create_node_with_resources_and_labels({}, {}, 1, {"CPU": 1}, {})
    assert events == [("sleep", 12.0), ("create", 1)]


def test_edge_replicas_serve_the_peak_previews_at_half_their_full_batch_throughput():
    # 2 sessions/s x 4 previews x 8 steps x 0.2 s / 16 per batch = 0.8 replica-s per s -> 1.6 -> 2
    assert edge_replicas_for(2.0, 4, 8, 0.2, 16) == 2
    assert edge_replicas_for(0.01, 1, 1, 0.01, 16) == 1
    assert edge_replicas_for(5.0, 4, 8, 0.2, 16) == 4  # 2.0 -> 4.0 exactly
    with pytest.raises(ValueError):
        edge_replicas_for(1.0, 4, 8, 0.0, 16)
    steps, batch, step_s = edge_step(AUTOSCALE_CONFIG)  # tiny-sd-gpu-timed on the shipped profile
    assert (steps, batch) == (8, 16) and step_s == pytest.approx(0.18643)
    edge = edge_autoscaling(3)
    assert edge["min_replicas"] == edge["max_replicas"] == 3 and "upscale_delay_s" in edge


def test_session_priors_are_the_share_lead_and_steps_an_earlier_run_measured():
    rows = [
        {"session": 0, "kind": "preview", "arrival_s": 1.0},
        {"session": 0, "kind": "edit", "arrival_s": 9.0},
        {"session": 0, "kind": "finalize", "arrival_s": 21.0},  # 20 s after its first preview
        {"session": 1, "kind": "preview", "arrival_s": 2.0},
        {"session": 1, "kind": "finalize", "arrival_s": 32.0},  # 30 s
        {"session": 2, "kind": "preview", "arrival_s": 3.0},  # never finalized
    ]
    assert session_priors(rows, 30.0) == {
        "prior_finalize_share": pytest.approx(2 / 3, abs=1e-4),
        "prior_preview_to_finalize_s": 25.0,
        "prior_preview_to_finalize_sd_s": 5.0,
        "prior_finalize_steps": 30.0,
    }
    assert session_priors(rows[-1:], 30.0) == {}
    ahead = cloud_autoscaling("ahead", session_priors(rows, 30.0))["policy"]["policy_kwargs"]
    assert ahead["prior_preview_to_finalize_s"] == 25.0 and ahead["target_wait_s"] > 0


def test_the_ahead_horizon_adds_up_the_delays_from_decision_to_a_serving_replica():
    """serve_config_autoscale.yaml: upscale delay 5 s, metrics averaged over 10 s and reported every 2 s;
    then the replica's start-up as measured, else node start-up and the profile's load (10 s)."""
    assert ahead_horizon_s(40.0, node_start_s=15.0) == pytest.approx(5.0 + 10.0 + 2.0 + 40.0)
    assert ahead_horizon_s(None, node_start_s=15.0) == pytest.approx(5.0 + 10.0 + 2.0 + 15.0 + 10.0)


def test_a_replicas_start_up_is_measured_from_serve_asking_for_it_to_its_running():
    def at(t: float, asked: int, running: int) -> dict:
        return {"t_s": t, "asked": {"cloud": asked}, "replicas": {"cloud": running}}

    # asked for a 2nd at 10 s (running at 40 s: 30 s), a 3rd and 4th at 20 s (50 s, 60 s: 30 s, 40 s)
    samples = [at(0, 1, 1), at(10, 2, 1), at(20, 4, 1), at(40, 4, 2), at(50, 4, 3), at(60, 4, 4)]
    assert replica_start_s(samples) == pytest.approx(40.0)  # the slowest
    assert replica_start_s([at(0, 1, 1), at(10, 1, 1)]) is None  # never scaled up


def test_the_cooldown_ends_once_replicas_and_nodes_are_back_where_they_started():
    up = [sample(0, 1, 3), sample(2, 2, 4), sample(4, 3, 5)]
    assert not back_at_start(up)
    assert not back_at_start([sample(t, 1, 3) for t in range(6)])  # never left: keep watching
    down = [*up, sample(6, 1, 5), sample(8, 1, 3), sample(10, 1, 3)]
    assert not back_at_start(down)  # two samples back, three needed
    assert back_at_start([*down, sample(12, 1, 3)])


def test_replica_seconds_are_counted_over_the_given_span_whenever_the_run_stopped():
    clouds = [1, 3, 3, 1]  # samples every 10 s; the run stopped sampling at 30 s
    samples = [sample(10.0 * i, c, 3) for i, c in enumerate(clouds)]
    timeline = build_timeline(samples, [], window_s=10.0)
    assert summarize(timeline, [], RAMP)["cloud_replica_s"] == pytest.approx(70.0)
    spanned = summarize(timeline, [], RAMP, span_s=50.0)
    assert spanned["cloud_replica_s"] == pytest.approx(70.0 + 1 * 20.0)  # the last value held to the span
    assert summarize(timeline, [], RAMP, span_s=15.0)["cloud_replica_s"] == pytest.approx(10.0 + 3 * 5.0)


def test_the_cooldown_is_over_once_nodes_are_at_their_fewest_even_if_the_first_sample_had_more():
    # an idle node of the start-up was still leaving when the load began
    samples = [sample(0, 1, 4), sample(2, 1, 3), sample(4, 3, 5), sample(6, 1, 3), sample(8, 1, 3)]
    assert not back_at_start(samples)
    assert back_at_start([*samples, sample(10, 1, 3)])


def test_exact_replica_s_follows_the_finalizes_that_arrived():
    from clients.bench_autoscale import exact_replica_s

    # 2 finalizes/s over [10, 30), capacity 1/s per replica: 2 replicas for the 19 seconds whose whole
    # 2-s window lies in it (11-29), the 1 minimum for the other 41 of 60
    rows = [row(10.0 + i * 0.5, "finalize", 100.0) for i in range(40)]
    rows += [row(5.0, "preview", 10.0)]  # previews are not the cloud's work
    assert exact_replica_s(rows, capacity_per_replica=1.0, span_s=60.0, window_s=2.0) == 19 * 2 + 41
    assert exact_replica_s(rows, capacity_per_replica=4.0, span_s=60.0, window_s=2.0) == 60.0
    assert exact_replica_s([], capacity_per_replica=1.0, span_s=30.0) == 30.0
    with pytest.raises(ValueError, match="capacity_per_replica"):
        exact_replica_s(rows, capacity_per_replica=0.0, span_s=60.0)
