"""What the ingress decides, without Ray: the write-behind preview store, the load view, and the frontend
(admission cost, preview/edit dispatch, responses, calibration feedback) over in-process tiers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from diffusionx.api import GenerateBody, PreviewBody, RefineBody
from diffusionx.policy.admission import AdmissionControl
from diffusionx.policy.calibration import LatencyCalibration
from diffusionx.policy.load import TierLoad, TierSnapshot
from diffusionx.requests import Route
from diffusionx.serving.errors import PreviewNotFound, TierOverloaded
from diffusionx.serving.frontend import Frontend
from diffusionx.serving.load_view import LoadView, cloud_load
from diffusionx.serving.preview_store import PreviewStore
from diffusionx.workflows.local import local_tiers
from tests.fakes import FakeClock


class SharedCache:
    """The shared state's preview cache, with puts that land only when the test lets them."""

    def __init__(self) -> None:
        self.pngs: dict[tuple[str, str], bytes] = {}
        self.landed = asyncio.Event()
        self.fail = False

    async def put(self, png: bytes, preview_id: str, owner: str) -> object:
        await self.landed.wait()
        if self.fail:
            raise ConnectionError("shared state restarting")
        self.pngs[(preview_id, owner)] = png
        return preview_id

    async def get(self, preview_id: str, owner: str) -> bytes | None:
        return self.pngs.get((preview_id, owner))


class Observer:
    def __init__(self) -> None:
        self.done: list[tuple[str, str]] = []
        self.routes: list[str] = []

    def request_done(self, endpoint: str, route: str, seconds: float) -> None:
        self.done.append((endpoint, str(route)))

    def routed(self, route: str, strength_predicted: float | None, strength_used: float) -> None:
        self.routes.append(str(route))


def test_a_preview_id_is_answered_from_the_store_before_and_after_its_put_lands():
    async def scenario() -> None:
        cache = SharedCache()
        store = PreviewStore(cache.put, cache.get, recent_bytes=0)  # no recent previews kept here
        preview_id = store.store(b"png", "alice")
        assert store.in_flight == 1 and await store.load(preview_id, "alice") == b"png"  # still in flight
        with pytest.raises(PreviewNotFound, match="unknown or has expired"):
            await store.load(preview_id, "bob")  # another key's preview: as if unknown
        cache.landed.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert store.in_flight == 0 and await store.load(preview_id, "alice") == b"png"  # from the cache
        cache.fail = True
        lost = store.store(b"lost", "alice")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert store.in_flight == 0  # a failed put leaves the map too (logged)
        with pytest.raises(PreviewNotFound):
            await store.load(lost, "alice")

    asyncio.run(scenario())


def test_the_latest_previews_are_answered_without_the_shared_cache_within_a_byte_bound():
    async def scenario() -> None:
        cache = SharedCache()
        cache.landed.set()
        store = PreviewStore(cache.put, cache.get, recent_bytes=10)
        first = store.store(b"aaaa", "alice")
        second = store.store(b"bbbb", "alice")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        cache.pngs.clear()  # the shared cache evicted them: this ingress still has both
        assert await store.load(first, "alice") == b"aaaa" and await store.load(second, "alice") == b"bbbb"
        with pytest.raises(PreviewNotFound):
            await store.load(first, "bob")  # another key's preview, even here
        third = store.store(b"cccc", "alice")  # 12 bytes > 10: the least recently used (second) goes
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        cache.pngs.clear()
        assert await store.load(third, "alice") == b"cccc" and await store.load(first, "alice") == b"aaaa"
        with pytest.raises(PreviewNotFound):
            await store.load(second, "alice")

    asyncio.run(scenario())


def test_the_load_view_feeds_admission_control_and_survives_a_failed_read():
    clock = FakeClock()
    admission = AdmissionControl({"cloud": 4}, max_wait_s=1.0, clock=clock)
    loads = {"cloud": TierLoad(queued_steps=400, replicas=1, step_time_s=(0.1, 0.0))}
    reads: list[int] = []

    async def read() -> dict[str, TierLoad]:
        reads.append(1)
        if len(reads) > 1:
            raise ConnectionError("shared state restarting")
        return loads

    async def scenario() -> None:
        view = LoadView(admission, read)
        await view.refresh()
        assert admission.wait_s("cloud") == pytest.approx(10.0)
        await view.refresh()  # the failed read keeps the last view (it ages out by itself)
        assert admission.wait_s("cloud") == pytest.approx(10.0)
        view.ensure_polling()
        first = view._poller
        view.ensure_polling()
        assert view._poller is first  # one poller
        assert first is not None
        first.cancel()

    asyncio.run(scenario())
    snapshot = TierSnapshot(pool=[(3, 3)], max_batch_size=2, step_time_s=[0.02, 0.01])
    load = cloud_load(TierLoad(replicas=1, per_replica=(snapshot,)))
    assert load.measured and load.replicas[0].pool == ((3, 3),)


@pytest.fixture
def frontend(tiny_cloud, tiny_edge) -> tuple[Frontend, SharedCache, Observer]:
    tiers = local_tiers(tiny_cloud, tiny_edge, max_batch_size=4)
    tiers.latency_calibration = LatencyCalibration()
    admission = AdmissionControl({"edge": 4, "cloud": 4}, max_wait_s=1.0)
    cache = SharedCache()
    cache.landed.set()
    observer = Observer()
    return Frontend(tiers, admission, PreviewStore(cache.put, cache.get), observer), cache, observer


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_a_preview_then_an_edit_of_it_by_id_then_a_predicted_edit(frontend):
    service, _, observer = frontend

    async def scenario() -> None:
        body = PreviewBody(prompt="a red circle", seed=3)
        needs = await service.preview_needs(body)
        assert needs == {"edge": service.tiers.edge.model.spec.preview_steps}  # type: ignore[union-attr]
        preview = await service.preview(body, "alice", needs)
        assert preview.strength is None and preview.strength_predicted is None
        edit = PreviewBody(prompt="a blue circle", seed=3, preview_id=preview.preview_id, strength=0.5)
        edited = await service.preview(edit, "alice", await service.preview_needs(edit))
        assert edited.strength == 0.5 and edited.strength_predicted is None
        predicted_body = PreviewBody(prompt="a blue square", seed=3, preview_id=preview.preview_id)
        predicted = await service.preview(
            predicted_body, "alice", await service.preview_needs(predicted_body)
        )
        assert predicted.strength_predicted == predicted.strength and predicted.strength is not None
        with pytest.raises(PreviewNotFound):
            await service.preview(PreviewBody(prompt="x", preview_id="nope", strength=0.5), "alice", {})
        assert service.admission.own_steps == {"edge": 0, "cloud": 0}  # every admitted request released

    run(scenario())
    assert observer.done == [("preview", "edge"), ("preview", "edit"), ("preview", "edit")]


def test_a_refinement_teaches_the_calibration_and_reports_its_route(frontend):
    service, _, observer = frontend

    async def scenario() -> None:
        preview = await service.preview(PreviewBody(prompt="a red circle"), "alice", {})
        body = RefineBody(prompt="a red circle", preview_id=preview.preview_id, num_inference_steps=6)
        needs = await service.refine_needs(body)
        assert set(needs) == {"cloud"}  # no latency target: the cloud's refinement, at most strength 1.0
        refined = await service.refine(body, "alice", needs)
        assert refined.route == Route.CLOUD and refined.strength_predicted is not None

    run(scenario())
    calibration = service.tiers.latency_calibration
    assert calibration is not None and calibration.samples == 1
    assert observer.routes == ["cloud"] and observer.done[-1] == ("refine", "cloud")


def test_generate_is_admitted_at_its_cost_and_refused_when_a_tier_is_full(frontend):
    service, _, observer = frontend

    async def scenario() -> None:
        body = GenerateBody(prompt="a red circle", mode="hybrid", num_inference_steps=8, switch_step=6)
        needs = await service.generate_needs(body)
        assert needs == {"cloud": 6, "edge": 2}
        generated = await service.generate(body, "", needs)
        assert generated.unet_calls == {"cloud": 6, "edge": 2, "approximated": 0}
        service.admission.update({"cloud": TierLoad(queued_steps=1000, replicas=1, step_time_s=(0.1, 0.0))})
        with pytest.raises(TierOverloaded, match="cloud tier") as refused:
            service.admit(needs)
        assert refused.value.retry_after_s >= 1

    run(scenario())
    assert observer.done == [("generate", "hybrid")]
