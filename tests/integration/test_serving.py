"""Integration tests against a real local Ray Serve cluster (one session-scoped application)."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.integration.conftest import TEST_CONFIG

pytestmark = pytest.mark.ray

# the application: the session-scoped `serve_url` and `http` fixtures in conftest.py


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(data: str) -> np.ndarray:
    return np.asarray(decode(data), dtype=np.int16)


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_edit_without_strength_uses_the_served_edit_predictor(http):
    first = http.post("/v1/preview", json={"prompt": "a red circle", "seed": 7}).json()
    assert first["strength_predicted"] is None and first["strength"] is None
    body = {"prompt": "a blue circle", "seed": 7, "preview_id": first["preview_id"]}
    edited = http.post("/v1/preview", json={**body, "previous_prompt": "a red circle"})
    assert edited.status_code == 200, edited.text
    edited = edited.json()
    # the test app serves the heuristic edit predictor (tiny-random); the learned grid is tested in-process
    assert 0.0 < edited["strength_predicted"] <= 1.0 and edited["strength"] == edited["strength_predicted"]
    assert edited["unet_calls"]["edge"] == int(4 * edited["strength"])  # tiny-random: 4 edit steps
    assert "predict" in edited["timings_ms"]


def test_health_names_the_models(http):
    body = http.get("/v1/health").json()
    assert body["status"] == "ok"
    assert body["edge"]["model"] == "tiny-random-edge" and body["cloud"]["model"] == "tiny-random"


def test_multi_round_session_over_http(http):
    first = http.post("/v1/preview", json={"prompt": "a red circle", "seed": 7})
    assert first.status_code == 200, first.text
    first = first.json()
    assert decode(first["image"]).size == (32, 32)
    assert first["unet_calls"] == {"cloud": 0, "edge": 2, "approximated": 0}
    edited = http.post(
        "/v1/preview",
        json={"prompt": "a blue circle", "seed": 7, "preview_id": first["preview_id"], "strength": 0.5},
    ).json()
    assert edited["strength"] == 0.5 and edited["unet_calls"]["edge"] == 2  # 4 edit steps x 0.5
    final = http.post(
        "/v1/refine",
        json={
            "prompt": "a blue circle",
            "seed": 7,
            "preview_id": edited["preview_id"],
            "num_inference_steps": 20,
        },
    )
    assert final.status_code == 200, final.text
    final = final.json()
    assert final["route"] == "cloud"
    assert 0.0 < final["strength_predicted"] <= 1.0 and final["strength_used"] == final["strength_predicted"]
    assert final["unet_calls"]["cloud"] == int(20 * final["strength_used"])
    assert decode(final["image"]).size == (32, 32)
    # the same refinement from the image itself (what a client does when an id expired)
    again = http.post(
        "/v1/refine",
        json={"prompt": "a blue circle", "seed": 7, "image": edited["image"], "num_inference_steps": 20},
    ).json()
    # `final` may be a speculation's, which can have shared its steps with the first preview's (superseded)
    # speculation: equal up to the kernels' last bits, at most 1 level (sampling/step_batching.py)
    assert np.abs(pixels(again["image"]) - pixels(final["image"])).max() <= 1
    # a strength override is used as given
    forced = http.post(
        "/v1/refine",
        json={
            "prompt": "a blue circle",
            "preview_id": edited["preview_id"],
            "strength": 0.5,
            "num_inference_steps": 20,
        },
    ).json()
    assert forced["strength_used"] == 0.5 and forced["unet_calls"]["cloud"] == 10


@pytest.mark.parametrize("mode", ["cloud", "edge", "diffusionx"])
def test_generate_modes(http, mode):
    response = http.post("/v1/generate", json={"prompt": "a green square", "seed": 3, "mode": mode})
    assert response.status_code == 200, response.text
    body = response.json()
    calls = body["unet_calls"]
    assert body["mode"] == mode
    assert (calls["cloud"] > 0) == (mode != "edge") and (calls["edge"] > 0) == (mode != "cloud")


def test_ec_diff_and_hybrid_pass_latents_from_the_cloud_tier_to_the_edge_tier(http):
    body = {"prompt": "a red circle", "seed": 5, "num_inference_steps": 50}
    ec = http.post(
        "/v1/generate",
        json={
            **body,
            "mode": "ec-diff",
            "warmup_steps": 7,
            "approx_interval": 2,
            "smoothing": 0.3,
            "switch_step": 37,
        },
    )
    assert ec.status_code == 200, ec.text
    ec = ec.json()
    assert ec["unet_calls"] == {"cloud": 17, "edge": 13, "approximated": 20}
    assert ec["parameters"] == {"switch_step": 37, "warmup_steps": 7, "approx_interval": 2, "smoothing": 0.3}
    hybrid = http.post("/v1/generate", json={**body, "mode": "hybrid", "switch_step": 30}).json()
    assert hybrid["unet_calls"] == {"cloud": 30, "edge": 20, "approximated": 0}
    # the served split equals the in-process sampler (same seed, same models)
    from diffusionx.models.loading import load_model
    from diffusionx.sampling.collaborative import (
        CollaborationParams,
        CollaborativeRequest,
        generate_collaborative,
    )

    cloud = load_model("tiny-random", device="cpu")
    edge = load_model("tiny-random-edge", device="cpu")
    params = CollaborationParams(
        num_inference_steps=50, switch_step=37, warmup_steps=7, approx_interval=2, smoothing=0.3
    )
    [local] = generate_collaborative(
        cloud, edge, [CollaborativeRequest("a red circle", seed=5, params=params)]
    )
    assert decode(ec["image"]).tobytes() == local.image.tobytes()
    stats = http.get("/v1/stats").json()["tiers"]
    assert stats["cloud"]["requests_served"] >= 2 and stats["edge"]["requests_served"] >= 2


def test_ec_diff_parameters_are_checked(http):
    response = http.post(
        "/v1/generate",
        json={
            "prompt": "a",
            "mode": "ec-diff",
            "warmup_steps": 9,
            "switch_step": 5,
            "num_inference_steps": 20,
        },
    )
    assert response.status_code == 422 and "warmup_steps" in response.json()["error"]


def test_concurrent_previews_form_batches(http, serve_url):
    def one(i: int) -> int:
        return httpx.post(
            f"{serve_url}/v1/preview", json={"prompt": f"a cat {i}", "seed": i}, timeout=120
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(8)))
    assert codes == [200] * 8
    sizes = http.get("/v1/stats").json()["tiers"]["edge"]["recent_batch_sizes"]
    assert max(sizes) > 1, sizes


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/preview", {"prompt": ""}, 422, "prompt"),
        ("/v1/preview", {"prompt": "   "}, 422, "non-whitespace"),
        ("/v1/preview", {"prompt": "x" * 1001}, 422, "at most 1000"),
        ("/v1/preview", {"prompt": "a", "width": 30}, 422, "multiple of 8"),
        ("/v1/preview", {"prompt": "a", "height": 2048}, 422, "between 8 and 1024"),
        ("/v1/preview", {"prompt": "a", "num_inference_steps": 0}, 422, "greater than or equal to 1"),
        (
            "/v1/preview",
            {"prompt": "a", "image": "bm90IGFuIGltYWdl", "strength": 0.5},
            422,
            "does not decode",
        ),
        ("/v1/preview", {"prompt": "a", "image": "@@@", "strength": 0.5}, 422, "not valid base64"),
        ("/v1/preview", {"prompt": "a", "preview_id": "abc"}, 404, "unknown or has expired"),
        ("/v1/preview", {"prompt": "a", "previous_prompt": "b"}, 422, "previous_prompt applies to an edit"),
        ("/v1/preview", {"prompt": "a", "prompt2": "b"}, 422, "Extra inputs"),
        ("/v1/preview", {"prompt": " ".join(["cat"] * 40)}, 422, "reads at most 32"),
        ("/v1/refine", {"prompt": "a", "preview_id": "missing"}, 404, "unknown or has expired"),
        ("/v1/refine", {"prompt": "a"}, 422, "exactly one of image or preview_id"),
        ("/v1/refine", {"prompt": "a", "preview_id": "x", "strength": 1.5}, 422, "less than or equal to 1"),
        ("/v1/generate", {"prompt": "a", "mode": "turbo"}, 422, "diffusionx"),
        (
            "/v1/generate",
            {"prompt": "a", "mode": "cloud", "warmup_steps": 3},
            422,
            "only apply to mode 'ec-diff'",
        ),
    ],
)
def test_bad_requests_get_4xx_with_a_reason(http, path, body, status, message):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert not response.json()["error"].startswith(("diffusionx.", "ray.", "Traceback"))


def test_oversized_image_is_refused(http):
    big = png_b64(Image.new("RGB", (1040, 16)))
    response = http.post("/v1/refine", json={"prompt": "a", "image": big})
    assert response.status_code == 422 and "at most 1024" in response.json()["error"]


def test_openapi_document_lists_the_api(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/preview", "/v1/refine", "/v1/generate", "/v1/health", "/v1/stats"} <= set(paths)


def test_overload_gets_503_with_retry_after_not_a_hang(serve_url):
    # the edge tier takes 8 ongoing + 8 queued requests; 40 slow ones at once must overflow it
    def one(i: int) -> httpx.Response:
        return httpx.post(
            f"{serve_url}/v1/preview",
            json={"prompt": "a dog", "seed": i, "num_inference_steps": 30},
            timeout=180,
        )

    with ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(one, range(40)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "no request was rejected under overload"
    assert all(r.headers.get("retry-after") for r in rejected), [
        (r.text, dict(r.headers)) for r in rejected[:2]
    ]
    assert 200 in codes


def test_a_burst_past_the_cloud_queue_is_refused_by_admission_control_at_the_door(serve_url):
    import asyncio

    from clients.shed_bench import run

    # the cloud tier holds 8 ongoing + 16 queued requests of one caller: 48 at once must overflow it, and
    # admission control (which knows that capacity) refuses the rest itself, before Serve's queue would
    result = asyncio.run(run(serve_url, 48, 20, 0.5, warmup=2, bursts=1, pause_s=0.0))
    [burst] = result["bursts"]
    assert burst["admitted"] + burst["shed_503"] == 48 and burst["other_errors"] == 0, burst
    assert 0 < burst["admitted"] <= 24 and burst["shed_503"] >= 24, burst
    assert set(burst["shed_by_source"]) == {"admission"}, burst  # none bounced off the tier's queue
    assert result["all_503_have_retry_after"], burst


def test_edge_replica_killed_mid_traffic_is_replaced_and_nothing_is_lost(http, serve_url):
    import ray

    def edge_replicas() -> list[str]:
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "EdgePreviewer" in a["name"] and a["name"].startswith("SERVE_REPLICA")
        ]

    [victim] = edge_replicas()
    outcomes: list[int | str] = []

    def one(i: int) -> None:
        try:
            response = httpx.post(
                f"{serve_url}/v1/preview",
                json={"prompt": "a tree", "seed": i, "num_inference_steps": 10},
                timeout=120,
            )
            outcomes.append(response.status_code)
        except httpx.HTTPError as error:  # an error is acceptable; silence or a hang is not
            outcomes.append(type(error).__name__)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for thread in threads:
        thread.join(timeout=150)
    assert not any(t.is_alive() for t in threads), "a request hung after the replica died"
    assert len(outcomes) == 6  # every request came back, as a success or an error
    assert all(o == 200 or (isinstance(o, int) and o >= 500) or isinstance(o, str) for o in outcomes), (
        outcomes
    )

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = http.post("/v1/preview", json={"prompt": "a tree", "seed": 99})
        if response.status_code == 200:
            break
        time.sleep(2)
    assert response.status_code == 200, response.text
    assert edge_replicas() and edge_replicas() != [victim]


def test_client_session_against_the_real_app(serve_url):
    from clients import DiffusionXClient

    with DiffusionXClient(serve_url) as client:
        session = client.session(seed=11)
        session.preview("a red circle on the left, blue background")
        session.preview("a green circle on the left, blue background", edit_strength=0.5)
        final = session.finalize()
    assert len(session.rounds) == 2 and final.route == "cloud"
    assert final.image.size == (32, 32) and final.unet_calls["cloud"] >= 1
    assert final.strength_used == final.strength_predicted


def test_demo_runs_end_to_end_through_the_http_client(serve_url, tmp_path):
    import json

    from clients.demo import main as demo_main

    assert demo_main(["--url", serve_url, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rounds"]) >= 3 and summary["final"]["route"] in (
        "cloud",
        "cloud-reduced",
        "edge-fallback",
    )
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "final.png" in pngs and sum(name.startswith("round_") for name in pngs) == len(summary["rounds"])
    assert (tmp_path / "summary.md").read_text().strip()


def test_refinements_of_different_strengths_share_cloud_batches(http, serve_url):
    """Step-level batching: concurrent refinements at mixed strengths run in shared UNet batches and each
    still gets the image it would get alone."""

    from diffusionx.models.loading import load_model
    from diffusionx.requests import Img2ImgRequest
    from diffusionx.sampling.generation import refine

    image = Image.new("RGB", (32, 32), (200, 40, 40))
    before = http.get("/v1/stats").json()["tiers"]["cloud"]["requests_served"]
    strengths = [0.3, 0.9, 0.5, 0.7]

    def one(strength: float) -> dict:
        response = httpx.post(
            f"{serve_url}/v1/refine",
            json={
                "prompt": "a red circle",
                "seed": 3,
                "image": png_b64(image),
                "strength": strength,
                "num_inference_steps": 20,
            },
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, strengths))
    assert [a["unet_calls"]["cloud"] for a in answers] == [int(20 * s) for s in strengths]
    assert max(a["timings_ms"]["batch_size"] for a in answers) > 1  # strengths shared a UNet batch
    deadline = time.monotonic() + 10  # the replica reports its load after answering, not before
    stats = http.get("/v1/stats").json()["tiers"]["cloud"]
    while time.monotonic() < deadline and stats["requests_served"] - before < 4:
        time.sleep(0.1)
        stats = http.get("/v1/stats").json()["tiers"]["cloud"]
    assert stats["requests_served"] - before == 4 and stats["queued_steps"] == 0 and stats["in_flight"] == 0
    cloud = load_model("tiny-random", device="cpu")
    for strength, answer in zip(strengths, answers, strict=True):
        [alone] = refine(
            cloud, [Img2ImgRequest("a red circle", image, strength, seed=3, num_inference_steps=20)]
        )
        served = np.asarray(decode(answer["image"]), dtype=np.int16)
        assert np.abs(served - np.asarray(alone.image, dtype=np.int16)).max() <= 1


def test_loadgen_records_finalizes_with_the_routers_prediction(serve_url, tmp_path):
    import csv

    from clients.loadgen import COLUMNS, main

    argv = ["--url", serve_url, "--workload", "finalize", "--rate", "3", "--duration-s", "2"]
    argv += ["--preview-pool", "2", "--latency-target-ms", "20000", "--num-inference-steps", "10"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress", "--seed", "3"]) == 0
    with (tmp_path / "requests.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS and rows
    assert len(list(csv.DictReader((tmp_path / "setup_requests.csv").open()))) == 2
    for row in rows:
        assert row["kind"] == "finalize" and row["status"] == "200", row
        # the warm-up seeded the step time: even the first finalize has a prediction
        assert row["route"] == "cloud" and float(row["expected_latency_ms"]) > 0
        assert int(row["cloud_unet_calls"]) > 0 and float(row["e2e_ms"]) > 0


def test_the_same_workflows_in_process_and_served_give_the_same_images_and_costs(http):
    """Every mode runs the library's workflow both ways: on in-process tiers and through the live Serve
    application (DeploymentHandle-backed tiers). Same seed, same models: same pixels, same unet_calls."""
    import asyncio

    from diffusionx.models.loading import load_model
    from diffusionx.requests import Img2ImgRequest, PreviewRequest
    from diffusionx.workflows import modes
    from diffusionx.workflows.local import local_tiers

    cloud = load_model("tiny-random", device="cpu")
    edge = load_model("tiny-random-edge", device="cpu", share_with=cloud)
    tiers = local_tiers(cloud, edge)
    base = {"prompt": "a red circle", "seed": 11}
    edited_from = Image.new("RGB", (32, 32), (30, 160, 90))

    async def in_process() -> dict[str, tuple]:
        out = {}
        for mode in ("cloud", "edge", "hybrid", "ec-diff", "diffusionx"):
            request = modes.GenerateRequest(base["prompt"], base["seed"], num_inference_steps=8)
            result = (await modes.generate(tiers, mode, request)).result
            out[mode] = (result.image, result.unet_calls.to_dict())
        result = await modes.preview(tiers, PreviewRequest(base["prompt"], base["seed"]))
        out["preview"] = (result.image, result.unet_calls.to_dict())
        result = await modes.edit(tiers, Img2ImgRequest(base["prompt"], edited_from, 0.5, base["seed"]))
        out["edit"] = (result.image, result.unet_calls.to_dict())
        final = await modes.refine(tiers, base["prompt"], edited_from, seed=base["seed"], strength=0.7)
        out["refine"] = (final.result.image, final.result.unet_calls.to_dict())
        return out

    local = asyncio.run(in_process())
    served = {}
    for mode in ("cloud", "edge", "hybrid", "ec-diff", "diffusionx"):
        answer = http.post("/v1/generate", json={**base, "mode": mode, "num_inference_steps": 8}).json()
        served[mode] = (decode(answer["image"]), answer["unet_calls"])
    answer = http.post("/v1/preview", json=base).json()
    served["preview"] = (decode(answer["image"]), answer["unet_calls"])
    edit_body = {**base, "image": png_b64(edited_from), "strength": 0.5}
    answer = http.post("/v1/preview", json=edit_body).json()
    served["edit"] = (decode(answer["image"]), answer["unet_calls"])
    answer = http.post("/v1/refine", json={**base, "image": png_b64(edited_from), "strength": 0.7}).json()
    assert answer["strength_predicted"] is None  # the request gave the strength: nothing was predicted
    served["refine"] = (decode(answer["image"]), answer["unet_calls"])
    for name, (image, calls) in local.items():
        served_image, served_calls = served[name]
        assert served_calls == calls, name
        assert np.array_equal(np.asarray(served_image.convert("RGB")), np.asarray(image)), name


def test_two_cloud_replicas_with_uneven_load_route_by_expected_finish(serve_url):
    """A second application with two CloudRefiner replicas (batch 1) and their step-aware request router:
    a long refinement sent while one replica is into another goes to the idle one (the router's ranking and
    its bookkeeping of requests sent between stats are unit-tested in test_cloud_router.py)."""
    from ray import serve

    from deployments.cloud import CloudRefiner
    from deployments.state import SharedState
    from diffusionx.policy.load import TierSnapshot
    from diffusionx.requests import Img2ImgRequest

    # the request router as the application's config sets it (its one place)
    [app] = yaml.safe_load(TEST_CONFIG.read_text())["applications"]
    [cloud_options] = [d for d in app["deployments"] if d["name"] == "CloudRefiner"]
    state = SharedState.options(ray_actor_options={"num_cpus": 0}).bind()
    cloud = CloudRefiner.options(
        num_replicas=2,
        autoscaling_config=None,
        ray_actor_options={"num_cpus": 0.1},
        request_router_config=cloud_options["request_router_config"],
    ).bind("tiny-random", state, device="cpu", max_batch_size=1, torch_threads=1)
    handle = serve.run(cloud, name="router-test", route_prefix=None)
    state_handle = serve.get_deployment_handle("SharedState", app_name="router-test")

    def replicas() -> list[TierSnapshot]:
        return list(state_handle.tier.remote("cloud").result().per_replica)

    def refinement(seed: int, steps: int) -> Img2ImgRequest:
        # 96 x 96: 200 steps take several seconds (7 s in process here), well past the wait below; at
        # 32 x 32 (about 1.2 s) the first could end before the second was sent, and two idle replicas
        # may both take the second
        image = Image.new("RGB", (96, 96), (seed * 40 % 256, 90, 160))
        return Img2ImgRequest("a red circle", image, 1.0, seed=seed, num_inference_steps=steps)

    try:
        deadline = time.monotonic() + 60
        while len(replicas()) < 2 and time.monotonic() < deadline:  # both replicas report
            time.sleep(0.2)
        long_one = handle.refine.remote(refinement(0, 200))  # seconds of work
        # 1. wait until one replica has started the long refinement and its stats say so
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(r.pool for r in replicas()):
            time.sleep(0.02)
        # the router has stats with the long one: a few request_routing_stats_period_s (0.5 s), since on
        # a busy 2-core host a stats call can come a period late (with one period and a bit, the second
        # refinement sometimes followed the first)
        time.sleep(2.0)
        # 2. another long one: behind the first there (its key is higher), alone on the other replica
        second = handle.refine.remote(refinement(1, 200))
        long_one.result(timeout_s=120), second.result(timeout_s=120)
        deadline = time.monotonic() + 10  # the replicas report after their last step
        while time.monotonic() < deadline and sum(r.requests_served for r in replicas()) < 2:
            time.sleep(0.1)
        assert sorted(r.requests_served for r in replicas()) == [1, 1], "both went to one replica"
    finally:
        serve.delete("router-test")


def test_bench_compare_report_counts_every_request_and_adds_up(serve_url, tmp_path):
    """A small `bench compare` against the live app: the summary's schema, every request counted, and
    each cost the mean over sessions of the per-request costs in requests.csv."""
    import csv
    import json
    from argparse import Namespace

    from clients.compare_bench import FIELDS, MODES, run_compare
    from clients.speculation_bench import FIELDS as SPECULATION_FIELDS

    settings = Namespace(
        out=str(tmp_path), sessions=2, rounds=2, think_s=0.05, session_rate=4.0, steps=8, load_x=2.0,
        load_s=2.0, max_finalizes=8, target_x=2.5, finalize_strength=1.0, preview_pool=2, drain_s=60.0,
        timeout_s=120.0, seed=5,
        no_progress=True, quality=False, speculation_only=False, spec_low_x=0.3, spec_max_session_rate=4.0,
        speculation_first="off",
    )  # fmt: skip
    summary = run_compare(serve_url, settings)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved) >= {"modes", "router", "ordering"} and set(saved["modes"]) == set(MODES)
    assert all(set(values) == set(FIELDS) for values in saved["modes"].values())
    assert set(saved["router"]["policies"]) == {"router", "fixed"}
    assert "expected_over_measured_median" in saved["router"]["calibration"]
    assert saved["ordering"]["fifo"]["finalize_latency_s_mean"] is None  # no local app to restart
    speculation = saved["speculation"]
    for load in ("low_load", "high_load"):
        for state in ("on", "off"):
            assert set(speculation[load][state]) >= set(SPECULATION_FIELDS), (load, state)
    assert speculation["low_load"]["off"]["speculative"] == {"off": 2}  # bypassed on every finalize
    assert speculation["low_load"]["edge_only_session_latency_s_mean"] is not None
    # the edge-only sessions run beside each low-load run, after an unmeasured pass of other sessions
    low = speculation["low_load"]
    assert low["edge_only_session_latency_s_mean"] == low["edge_only_beside_on_session_latency_s_mean"]
    assert low["edge_only_beside_off_session_latency_s_mean"] is not None
    # low load is sized on the lower of the cloud's finalize capacity and the sessions the app completes
    capacities = {
        "cloud": speculation["capacity_finalizes_per_s"],
        "sessions": speculation["session_capacity_per_s"],
    }
    assert min(capacities.values()) > 0 and speculation["low_load"]["bottleneck"] == min(
        capacities, key=capacities.get
    )
    rows = list(csv.DictReader((tmp_path / "requests.csv").open()))
    for run, counts in summary["counts"].items():
        mine = [row for row in rows if row["run"] == run]
        assert counts["requests"] == len(mine) and counts["errors"] == 0, run
        sessions = {row["session"] or str(i) for i, row in enumerate(mine)}
        total_cloud = sum(int(row["cloud_unet_calls"] or 0) for row in mine)
        assert counts["sessions"] == len(sessions)
        assert abs(summary_cost(summary, run) * len(sessions) - total_cloud) < 1e-2 * len(sessions), run
    assert summary["counts"]["mode-diffusionx"]["sessions"] == 2  # every session sent was counted
    for run in ("mode-warm", "spec-warm-on", "spec-warm-off", "spec-low-edge-on", "spec-low-edge-off"):
        assert summary["counts"][run]["sessions"] == 2, run
    offered = saved["router"]["offered_finalizes"]
    assert (
        summary["counts"]["policy-router"]["finalizes"]
        == offered
        == summary["counts"]["policy-fixed"]["finalizes"]
    )
    for name in (
        "latency_cdf.png",
        "cost_quality.png",
        "expected_measured.png",
        "modes.csv",
        "policies.csv",
        "speculation_cdf.png",
    ):
        assert (tmp_path / name).stat().st_size > 0


def summary_cost(summary: dict, run: str) -> float:
    return summary["counts"][run]["cloud_unet_calls"] or 0.0
