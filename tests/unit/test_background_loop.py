"""Background (speculative) work in the model loop: a real `StepBatcher` on the tiny model, a fake clock
that advances one second per batcher step, and a gate that holds a step "in flight" while a test submits
a foreground burst."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from diffusionx.engine.model_loop import ModelLoop
from diffusionx.requests import Img2ImgRequest
from diffusionx.sampling.step_batching import StepBatcher

STEP_S = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class StepRunner:
    """Runs blocking calls inline; a batcher step takes STEP_S on the fake clock and, while `hold` is
    set, waits for the test to let it finish (the step is in flight meanwhile)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.hold = False
        self.release = asyncio.Event()
        self.in_flight = asyncio.Event()

    async def __call__(self, function, *args):
        await asyncio.sleep(0)
        if getattr(function, "__name__", "") == "step":
            if self.hold:
                self.in_flight.set()
                await self.release.wait()
                self.hold = False
            self.clock.now += STEP_S
        return function(*args)


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def refinement(seed: int, strength: float = 1.0, steps: int = 10) -> Img2ImgRequest:
    return Img2ImgRequest("a red circle", picture(seed), strength, seed=seed, num_inference_steps=steps)


def make_loop(tiny_cloud, max_batch_size: int = 2):
    clock = Clock()
    runner = StepRunner(clock)
    loop = ModelLoop(max_batch_size, clock=clock, run_blocking=runner)
    batcher = StepBatcher(tiny_cloud, max_batch_size)
    batcher.background_limit = lambda foreground: 0  # a CPU: background never shares a foreground step
    loop.enable_step_batching("refine", batcher)
    loop.register("generate", lambda requests: [f"image of {r}" for r in requests])
    return loop, batcher, runner, clock


def steps_of(request: Img2ImgRequest) -> int:
    return int(request.num_inference_steps * request.strength)


def unloaded(loop: ModelLoop) -> bool:
    m = loop.monitor
    work = loop.work()
    return (m.queued, m.in_flight, m.queued_steps, m.pool) == (0, 0, 0, []) and work.running_steps == 0


async def foreground_burst(
    loop: ModelLoop, clock: Clock, requests: list[Img2ImgRequest], seen: list | None = None
) -> list[float]:
    """Latency (fake seconds) of each request of a burst sent at once; `seen` gets the background work
    (jobs, steps left) as each one finishes."""
    sent = clock.now

    async def one(request: Img2ImgRequest) -> float:
        await loop.run("refine", request, steps_of(request))
        if seen is not None:
            seen.append(loop.background_work())
        return clock.now - sent

    return list(await asyncio.gather(*(one(request) for request in requests)))


def test_background_work_is_never_load_and_runs_when_the_replica_is_idle(tiny_cloud):
    async def scenario():
        loop, _batcher, _runner, _clock = make_loop(tiny_cloud)
        job = loop.submit("refine", refinement(1), 10, background=True)
        loop.release([job])
        await asyncio.sleep(0)
        seen = []
        while not job.future.done():
            seen.append((unloaded(loop), loop.background_work()[0], loop.monitor.background_requests))
            await asyncio.sleep(0)
        assert seen and all(is_unloaded and jobs == 1 for is_unloaded, jobs, _ in seen), seen
        assert seen[-1][2] == 1 and loop.monitor.snapshot().background_steps >= 0
        result = await loop.wait(job)
        assert result.unet_calls.cloud == 10 and unloaded(loop) and loop.background_work() == (0, 0)
        assert loop.monitor.requests_served == 0 and loop.monitor.snapshot().background_requests == 0
        with pytest.raises(ValueError, match="cannot run in the background"):
            loop.submit("generate", "x", 1, background=True)

    asyncio.run(scenario())


def test_a_foreground_burst_is_slowed_by_at_most_the_one_background_step_in_flight(tiny_cloud):
    async def scenario():
        burst = [refinement(10 + i, 0.3) for i in range(2)]  # 3 steps each, one full batch
        # baseline: the burst on an idle replica
        loop, _batcher, _runner, clock = make_loop(tiny_cloud)
        alone = await foreground_burst(loop, clock, burst)
        assert alone == [3 * STEP_S, 3 * STEP_S]
        # the same burst arriving while a speculative refinement's step is in flight
        loop, batcher, runner, clock = make_loop(tiny_cloud)
        speculative = loop.submit("refine", refinement(1), 10, background=True)
        loop.release([speculative])
        while speculative.steps_done < 2:
            await asyncio.sleep(0)
        runner.hold = True
        await runner.in_flight.wait()  # step 3 of the speculation is running
        seen: list[tuple[int, int]] = []
        burst_task = asyncio.create_task(foreground_burst(loop, clock, burst, seen))
        await asyncio.sleep(0)
        runner.release.set()
        latencies = await burst_task
        assert all(latency <= a + STEP_S for latency, a in zip(latencies, alone, strict=True))
        assert seen == [(1, 7), (1, 7)]  # paused after its step 3 during the burst, not cancelled
        result = await loop.wait(speculative)  # resumes once the replica is idle again
        assert result.step_batch_sizes == [1] * 10 and unloaded(loop)
        assert batcher.idle

    asyncio.run(scenario())


def test_a_promoted_job_counts_as_load_from_then_on_and_gives_the_foreground_pixels(tiny_cloud):
    async def scenario():
        loop, _batcher, _runner, _clock = make_loop(tiny_cloud, max_batch_size=1)
        reference = await loop.run("refine", refinement(4), 10)
        blocker = asyncio.create_task(loop.run("refine", refinement(5, 0.5), 5))  # foreground first
        speculative = loop.submit("refine", refinement(4), 10, background=True)
        loop.release([speculative])
        while speculative.state != "running" or speculative.ticket is None:
            await asyncio.sleep(0)
        assert speculative.steps_done == 0 and loop.monitor.in_flight == 1  # paused: only the blocker
        assert loop.promote(speculative) and not loop.promote(speculative)
        assert loop.monitor.in_flight == 2 and loop.monitor.queued_steps >= 10
        assert sorted(remaining for _, remaining in loop.monitor.pool)[-1] == 10
        result = await loop.wait(speculative)
        await blocker
        assert np.array_equal(np.asarray(result.image), np.asarray(reference.image))
        assert result.unet_calls == reference.unet_calls and unloaded(loop)
        assert loop.monitor.requests_served == 3  # the reference, the blocker and the promoted one

    asyncio.run(scenario())


def test_a_job_promoted_before_it_joins_is_admitted_as_foreground(tiny_cloud):
    async def scenario():
        loop, _batcher, _runner, _clock = make_loop(tiny_cloud)
        job = loop.submit("refine", refinement(2, 0.3), 3, background=True)
        assert loop.promote(job) and loop.monitor.queued == 1 and loop.monitor.queued_steps == 3
        loop.release([job])
        result = await loop.wait(job)
        assert result.unet_calls.cloud == 3 and unloaded(loop) and loop.monitor.requests_served == 1

    asyncio.run(scenario())


def test_a_cancelled_background_job_leaves_nothing_behind(tiny_cloud):
    async def scenario():
        loop, batcher, _runner, _clock = make_loop(tiny_cloud)
        waiting = loop.submit("refine", refinement(3), 10, background=True)
        loop.cancel(waiting)  # before it was released
        assert waiting.future.cancelled() and loop.background_work() == (0, 0)
        job = loop.submit("refine", refinement(3), 10, background=True)
        loop.release([job])
        while job.steps_done < 2:
            await asyncio.sleep(0)
        loop.cancel(job)
        assert job.future.cancelled() and batcher.idle and loop.background_work() == (0, 0)
        assert unloaded(loop) and loop.monitor.background_requests == 0
        assert (await loop.run("refine", refinement(5, 0.3), 3)).unet_calls.cloud == 3  # still serving

    asyncio.run(scenario())


def test_a_waiting_whole_batch_is_not_held_up_by_background_steps(tiny_cloud):
    async def scenario():
        loop, _batcher, _runner, _clock = make_loop(tiny_cloud)
        speculative = loop.submit("refine", refinement(1), 10, background=True)
        loop.release([speculative])
        while speculative.steps_done < 1:
            await asyncio.sleep(0)
        image = await loop.run("generate", "a cat", 5)
        assert image == "image of a cat"
        assert speculative.steps_done <= 2  # at most the step in flight ran before the whole batch
        await loop.wait(speculative)

    asyncio.run(scenario())


def test_background_steps_wait_for_the_gate_and_foreground_does_not(tiny_cloud):
    async def scenario():
        loop, _batcher, runner, _clock = make_loop(tiny_cloud)
        open_gate = False
        loop.background_gate = lambda: open_gate
        loop.background_poll_s = 0.001
        speculative = loop.submit("refine", refinement(1, steps=4), 4, background=True)
        loop.release([speculative])
        for _ in range(20):  # the host is busy: the background job is admitted but takes no step
            await asyncio.sleep(0.002)
        assert speculative.steps_done == 0 and not speculative.future.done()
        foreground = await loop.run("refine", refinement(2, steps=3), 3)  # runs at once, gate or not
        assert foreground is not None and speculative.steps_done == 0
        open_gate = True  # the host is idle again: the background job runs to its end
        result = await asyncio.wait_for(loop.wait(speculative), 5.0)
        assert result is not None and speculative.steps_done == 4
        assert runner.hold is False

    asyncio.run(scenario())


def test_steps_of_background_work_alone_do_not_teach_the_step_time(tiny_cloud):
    # they run only while the gate says the host is idle: their time is not what a foreground step costs
    async def scenario():
        loop, _batcher, _runner, _clock = make_loop(tiny_cloud)
        job = loop.submit("refine", refinement(1, steps=4), 4, background=True)
        loop.release([job])
        await loop.wait(job)
        assert loop.monitor.step_time.observations == 0 and not loop.monitor.step_time.measured
        assert list(loop.monitor.batch_sizes) == []
        await loop.run("refine", refinement(2, steps=4), 4)
        assert loop.monitor.step_time.observations == 4
        assert loop.monitor.step_time.coefficients() == pytest.approx((STEP_S, 0.0))

    asyncio.run(scenario())
