"""What the model loop tells the outside (the library side of metrics and streamed progress): observer
events per model call and per finished job, the queued/running split of the load, and per-request step
progress, with fake models and an injected clock, then with the tiny models through the workflows."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from diffusionx.engine.model_loop import LoopObserver, LoopWork, ModelLoop
from diffusionx.engine.progress import stream_progress
from diffusionx.engine.tiers import CloudModel, EdgeModel
from diffusionx.requests import Img2ImgRequest, PreviewRequest
from diffusionx.workflows import modes
from tests.fakes import FakeClock, FakeModel, FakeStepper, GatedRunner


class RecordingObserver(LoopObserver):
    def __init__(self) -> None:
        self.batches: list[tuple[str, int, int, float]] = []
        self.jobs: list[tuple[str, float, float, bool]] = []

    def batch_ran(self, kind: str, batch_size: int, steps: int, elapsed_s: float) -> None:
        self.batches.append((kind, batch_size, steps, elapsed_s))

    def job_finished(self, kind: str, queue_s: float, run_s: float, ok: bool) -> None:
        self.jobs.append((kind, queue_s, run_s, ok))


def test_whole_batches_report_batch_and_job_times_and_split_queued_from_running_work():
    async def scenario():
        clock = FakeClock()
        runner = GatedRunner(clock, seconds=0.5)
        observer = RecordingObserver()
        loop = ModelLoop(4, clock=clock, run_blocking=runner, observer=observer)
        loop.register("preview", FakeModel())
        first = asyncio.create_task(loop.run("preview", "a", 10))
        for _ in range(5):
            await asyncio.sleep(0)  # a's batch starts at t=100
        clock.now += 1.0  # a second passes with a in the model; then b and c arrive
        later = [asyncio.create_task(loop.run("preview", name, 10)) for name in ("b", "c")]
        for _ in range(5):
            await asyncio.sleep(0)
        assert loop.work() == LoopWork(
            queued_requests=2, queued_steps=20, running_requests=1, running_steps=10
        )
        runner.gate.set()
        await asyncio.gather(first, *later)
        assert loop.work() == LoopWork()
        assert observer.batches == [("preview", 1, 10, 1.5), ("preview", 2, 10, 0.5)]
        assert observer.jobs[0] == ("preview", 0.0, 1.5, True)
        assert observer.jobs[1] == ("preview", 0.5, 0.5, True)  # b: queued from t=101 to a's end at 101.5

    asyncio.run(scenario())


def test_step_batched_jobs_report_each_step_and_their_remaining_steps_as_running_work():
    async def scenario():
        clock = FakeClock()
        runner = GatedRunner(clock, seconds=0.25)
        runner.gate.set()
        observer = RecordingObserver()
        loop = ModelLoop(8, clock=clock, run_blocking=runner, observer=observer)
        loop.enable_step_batching("refine", FakeStepper())
        progress: dict[str, list[tuple[int, int]]] = {"long": [], "short": []}
        seen_work: list[LoopWork] = []
        loop.on_change = lambda: seen_work.append(loop.work())

        def listener(name: str):
            return lambda step, total: progress[name].append((step, total))

        await asyncio.gather(
            loop.run("refine", ("long", 3), 3, on_progress=listener("long")),
            loop.run("refine", ("short", 1), 1, on_progress=listener("short")),
        )
        assert progress == {"long": [(1, 3), (2, 3), (3, 3)], "short": [(1, 1)]}
        assert [b[:3] for b in observer.batches] == [("refine", 2, 1), ("refine", 1, 1), ("refine", 1, 1)]
        assert sorted(j[0] for j in observer.jobs) == ["refine", "refine"] and all(
            j[3] for j in observer.jobs
        )
        # after the first step: long has 2 steps left in the model, short is done
        assert LoopWork(queued_requests=0, queued_steps=0, running_requests=1, running_steps=2) in seen_work
        assert loop.work() == LoopWork()

    asyncio.run(scenario())


def test_a_failed_job_is_reported_as_an_error():
    async def scenario():
        observer = RecordingObserver()
        clock = FakeClock()
        runner = GatedRunner(clock)
        runner.gate.set()
        loop = ModelLoop(4, clock=clock, run_blocking=runner, observer=observer)
        loop.register("preview", FakeModel())
        outcome = await asyncio.gather(loop.run("preview", "bad", 1), return_exceptions=True)
        assert isinstance(outcome[0], RuntimeError)
        assert [j[3] for j in observer.jobs] == [False]

    asyncio.run(scenario())


def test_workflows_stream_every_denoising_step_of_previews_edits_and_refinements(tiny_edge, tiny_cloud):
    async def scenario():
        tiers = modes.Tiers(edge=EdgeModel(tiny_edge, 4), cloud=CloudModel(tiny_cloud, 4))
        steps: list[tuple[int, int, str]] = []
        record = lambda step, total, tier: steps.append((step, total, tier))  # noqa: E731
        preview = await modes.preview(tiers, PreviewRequest("a red circle", seed=1), on_progress=record)
        assert steps == [(1, 2, "edge"), (2, 2, "edge")] and preview.unet_calls.edge == 2
        steps.clear()
        edit = Img2ImgRequest("a blue circle", preview.image, 0.5, num_inference_steps=6)
        await modes.edit(tiers, edit, on_progress=record)
        assert steps == [(1, 3, "edge"), (2, 3, "edge"), (3, 3, "edge")]
        steps.clear()
        final = await modes.refine(
            tiers, "a blue circle", preview.image, strength=0.4, num_inference_steps=10, on_progress=record
        )
        assert steps == [(i, 4, "cloud") for i in range(1, 5)] and final.result.unet_calls.cloud == 4
        # without a listener the same image comes back
        again = await modes.refine(
            tiers, "a blue circle", preview.image, strength=0.4, num_inference_steps=10
        )
        assert list(again.result.image.getdata()) == list(final.result.image.getdata())
        assert isinstance(again.result.image, Image.Image)

    asyncio.run(scenario())


def test_stream_progress_yields_reports_then_the_result_and_closing_it_cancels_the_run():
    async def scenario():
        async def work(report):
            for step in (1, 2, 3):
                await asyncio.sleep(0)
                report(step, 3)
            return "done"

        items = [item async for item in stream_progress(work)]
        assert items == [("progress", (1, 3)), ("progress", (2, 3)), ("progress", (3, 3)), ("result", "done")]

        async def failing(report):
            report(1, 2)
            raise ValueError("bad")

        stream = stream_progress(failing)
        assert await anext(stream) == ("progress", (1, 2))
        with pytest.raises(ValueError, match="bad"):
            await anext(stream)

        cancelled = asyncio.Event()

        async def endless(report):
            try:
                while True:
                    report(0, 1)
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        stream = stream_progress(endless)
        await anext(stream)
        await stream.aclose()  # the consumer went away
        await asyncio.wait_for(cancelled.wait(), 1.0)

    asyncio.run(scenario())
