"""The Ray-free model loop with fake models, a gated model runner and an injected clock (as Ray Serve tests
its routers): batching without a window, merging under load, and that no request is ever lost."""

from __future__ import annotations

import asyncio

import pytest

from diffusionx.engine.model_loop import ModelLoop
from diffusionx.engine.reporter import CoalescingReporter
from tests.fakes import FakeClock, FakeModel, FakeStepper, GatedRunner


def make_loop(max_batch_size: int = 4, seconds: float = 0.5):
    clock = FakeClock()
    runner = GatedRunner(clock, seconds)
    loop = ModelLoop(max_batch_size, clock=clock, run_blocking=runner)
    model = FakeModel()
    loop.register("preview", model)
    return loop, model, runner, clock


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def idle(loop: ModelLoop) -> bool:
    m = loop.monitor
    return (m.queued, m.in_flight, m.queued_steps) == (0, 0, 0) and not loop.busy


def test_a_lone_request_runs_at_once_and_queue_time_comes_from_the_clock():
    async def scenario():
        loop, model, runner, _clock = make_loop()
        runner.gate.set()
        result = await loop.run("preview", "a", 10)
        assert result.value == "A" and model.batches == [["a"]]
        assert result.timings_ms == {"queue": 0.0, "batch_size": 1.0}  # no batch window
        assert loop.monitor.seconds_per_step == pytest.approx(0.5 / 10)  # the clock's model time
        assert idle(loop) and loop.monitor.requests_served == 1

    asyncio.run(scenario())


def test_requests_that_arrive_while_the_model_is_busy_form_the_next_batch():
    async def scenario():
        loop, model, runner, _clock = make_loop(max_batch_size=3)
        first = asyncio.create_task(loop.run("preview", "a", 10))
        await settle()
        assert runner.calls == 1 and model.batches == []  # "a" is in the model, alone
        later = [asyncio.create_task(loop.run("preview", name, 10)) for name in "bcde"]
        await settle()
        assert loop.monitor.queued == 4 and loop.monitor.in_flight == 1
        runner.gate.set()
        results = await asyncio.gather(first, *later)
        assert [r.value for r in results] == list("ABCDE")
        assert model.batches == [["a"], ["b", "c", "d"], ["e"]]  # merged up to max_batch_size
        assert results[1].timings_ms["batch_size"] == 3.0 and results[1].timings_ms["queue"] == 500.0
        assert idle(loop) and list(loop.monitor.batch_sizes) == [1, 3, 1]

    asyncio.run(scenario())


def test_a_failing_model_call_fails_only_its_own_request_and_the_loop_keeps_serving():
    async def scenario():
        loop, model, runner, _ = make_loop()
        busy = asyncio.create_task(loop.run("preview", "a", 1))
        await settle()
        tasks = [asyncio.create_task(loop.run("preview", name, 1)) for name in ("b", "bad", "c")]
        await settle()
        runner.gate.set()
        outcomes = await asyncio.gather(busy, *tasks, return_exceptions=True)
        assert [getattr(o, "value", None) for o in outcomes] == ["A", "B", None, "C"]
        assert isinstance(outcomes[2], RuntimeError) and "'bad'" in str(outcomes[2])
        # the merged batch failed, so each request ran alone: only 'bad' got the error
        assert model.batches[1] == ["b", "bad", "c"] and model.batches[2:] == [["b"], ["bad"], ["c"]]
        assert (await loop.run("preview", "d", 1)).value == "D"  # still serving
        assert idle(loop)

    asyncio.run(scenario())


def test_a_model_giving_the_wrong_number_of_results_fails_its_requests_not_the_loop():
    async def scenario():
        loop, _, runner, _ = make_loop()
        loop.register("short", lambda requests: [])
        runner.gate.set()
        with pytest.raises(RuntimeError, match="0 results for 1 requests"):
            await loop.run("short", "x", 1)
        assert (await loop.run("preview", "y", 1)).value == "Y" and idle(loop)

    asyncio.run(scenario())


def test_a_cancelled_waiting_request_leaves_the_queue_and_gives_its_load_back():
    async def scenario():
        loop, model, runner, _ = make_loop()
        busy = asyncio.create_task(loop.run("preview", "a", 10))
        await settle()
        gone = asyncio.create_task(loop.run("preview", "gone", 25))
        await settle()
        assert (loop.monitor.queued, loop.monitor.queued_steps) == (1, 35)
        gone.cancel()  # the client disconnected
        await settle()
        assert (loop.monitor.queued, loop.monitor.queued_steps) == (0, 10)
        runner.gate.set()
        await busy
        await settle()
        assert model.batches == [["a"]]  # the model never saw it
        assert idle(loop) and loop.monitor.requests_served == 1

    asyncio.run(scenario())


def test_a_request_cancelled_while_its_batch_runs_gets_no_result_and_breaks_nothing():
    async def scenario():
        loop, _model, runner, _ = make_loop()
        running = asyncio.create_task(loop.run("preview", "a", 10))
        await settle()
        running.cancel()  # its future is done (cancelled) before the model returns
        await settle()
        runner.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert (await loop.run("preview", "b", 1)).value == "B"  # the loop did not die on set_result
        assert idle(loop)

    asyncio.run(scenario())


def test_submitted_but_not_released_jobs_cancel_cleanly():
    """With Serve, a job waits in @serve.batch's queue before it is released to the loop."""

    async def scenario():
        loop, model, _runner, _ = make_loop()
        job = loop.submit("preview", "a", 7)
        assert (loop.monitor.queued, loop.monitor.queued_steps) == (1, 7)
        loop.cancel(job)
        loop.release([job])  # Serve may still hand it over: skipped
        await settle()
        assert job.future.cancelled() and model.batches == [] and idle(loop)

    asyncio.run(scenario())


def test_unknown_kind_is_refused_before_it_counts_as_load():
    async def scenario():
        loop, *_ = make_loop()
        with pytest.raises(ValueError, match="kind='refine' is not registered: use one of preview"):
            loop.submit("refine", "x", 1)
        assert idle(loop)

    asyncio.run(scenario())


# -- step-level batching through the loop, with a fake stepper ----------------------------------------------


def make_step_loop():
    clock = FakeClock()
    runner = GatedRunner(clock, seconds=0.25)
    runner.gate.set()
    loop = ModelLoop(8, clock=clock, run_blocking=runner)
    stepper = FakeStepper()
    loop.enable_step_batching("refine", stepper)
    loop.register("preview", FakeModel())
    return loop, stepper


def test_step_batched_requests_join_between_steps_and_release_their_load_step_by_step():
    async def scenario():
        loop, stepper = make_step_loop()
        long = asyncio.create_task(loop.run("refine", ("long", 4), 4))
        short = asyncio.create_task(loop.run("refine", ("short", 1), 1))
        zero = asyncio.create_task(loop.run("refine", ("zero", 0), 0))
        invalid = asyncio.create_task(loop.run("refine", ("invalid", 3), 3))
        outcomes = await asyncio.gather(long, short, zero, invalid, return_exceptions=True)
        assert [getattr(o, "value", None) for o in outcomes[:3]] == ["long", "short", "zero"]
        assert isinstance(outcomes[3], ValueError)  # failed alone, at admission
        assert stepper.steps == 4 and outcomes[1].timings_ms["batch_size"] == 2.0
        assert loop.monitor.seconds_per_step == pytest.approx(0.25)
        assert idle(loop) and loop.monitor.requests_served == 4

    asyncio.run(scenario())


def test_a_failed_step_fails_its_samples_and_the_loop_serves_the_next_request():
    async def scenario():
        loop, _stepper = make_step_loop()
        outcomes = await asyncio.gather(
            loop.run("refine", ("boom", 3), 3), loop.run("refine", ("other", 3), 3), return_exceptions=True
        )
        assert all(isinstance(o, RuntimeError) for o in outcomes)  # both were in the failed step
        assert idle(loop)
        assert (await loop.run("refine", ("after", 2), 2)).value == "after"
        assert (await loop.run("preview", "p", 1)).value == "P"

    asyncio.run(scenario())


def test_a_cancelled_step_batched_request_leaves_the_pool_and_undoes_its_load():
    async def scenario():
        loop, stepper = make_step_loop()
        stay = asyncio.create_task(loop.run("refine", ("stay", 40), 40))
        gone = asyncio.create_task(loop.run("refine", ("gone", 50), 50))
        while not any(t.steps_run for t in stepper.pool):
            await asyncio.sleep(0)
        gone.cancel()
        await settle()
        assert [t.request[0] for t in stepper.pool] == ["stay"]
        assert (await stay).value == "stay"
        assert idle(loop) and loop.monitor.requests_served == 1

    asyncio.run(scenario())


def test_nothing_grows_with_traffic():
    async def scenario():
        loop, stepper = make_step_loop()
        for round_ in range(20):
            await asyncio.gather(
                *(loop.run("refine", (f"r{round_}-{i}", 1 + i % 3), 1 + i % 3) for i in range(5)),
                *(loop.run("preview", f"p{i}", 1) for i in range(5)),
            )
        assert idle(loop) and not loop._stepping and not loop._waiting and stepper.idle
        assert loop.monitor.requests_served == 200 and len(loop.monitor.batch_sizes) <= 64

    asyncio.run(scenario())


def test_reporter_keeps_at_most_one_send_in_flight_and_sends_the_latest_state():
    async def scenario():
        sent: list[int] = []
        release = asyncio.Event()
        state = {"value": 0}

        async def send() -> None:
            await release.wait()
            sent.append(state["value"])

        reporter = CoalescingReporter(send)
        for value in range(100):  # 100 load changes while the receiver is slow
            state["value"] = value
            reporter.request()
        await settle()
        assert reporter.sends == 1 and reporter.in_flight
        release.set()
        while reporter.in_flight:
            await asyncio.sleep(0)
        assert sent == [99, 99] and reporter.sends == 2  # one more send, with the latest state

        async def failing() -> None:
            raise ConnectionError("state actor gone")

        broken = CoalescingReporter(failing)
        broken.request()
        await settle()
        assert not broken.in_flight  # best effort: the error is swallowed

    asyncio.run(scenario())
