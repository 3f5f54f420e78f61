"""The model loop of one tier replica: forms batches from whatever waits, runs them off the event loop,
and never loses a request.

Algorithm. A request becomes a `Job` (`submit`: it counts as queued load from then on) and is handed to
the loop (`release`; Ray Serve's `@serve.batch` does this in the deployments, in-process callers do it at
once). Whenever the model is free the loop takes the oldest waiting job and every later waiting job of the
same kind, up to `max_batch_size`, and runs them as one blocking model call (in a worker thread). So a lone
request runs at once, with no batch window, and under load the jobs that arrived while the model was busy
form the next, fuller batch.

A kind registered with `enable_step_batching` (the cloud tier's refinements) goes to a `StepBatcher`
instead: each sample carries its own timestep, new samples join between denoising steps and finished ones
leave. The loop alternates one step of the batcher with one whole batch of any other kind, so neither
starves.

Background jobs (`submit(..., background=True)`: speculative refinements, step-batched kinds only) are
never counted as load: not in the monitor's queue, in-flight work or pool, not in `work()`. In the step
batcher they take only the slots foreground leaves (`StepBatcher`), and the loop does not run a step made
of background samples alone while a whole batch of another kind waits, so foreground work waits for at
most the one step already in flight. `promote(job)` turns a background job into a foreground one (counted
from then on with its remaining steps); `cancel` drops it.

Never losing a request:
- a model call that raises fails the jobs it concerns with that error: a merged batch that fails is re-run
  one job at a time, so one bad request does not take its batch-mates down; a failed step or VAE decode
  fails the samples it touched (the `StepBatcher` reports them); the loop keeps serving the rest;
- results are only set on futures that are not done (a caller may have gone);
- `cancel` (the caller is gone) takes a job out of the queue or the step pool and undoes its load;
- nothing is keyed by `id()`; the only maps hold live jobs and shrink as they finish.

Observing: `observer` (a `LoopObserver`) hears of every model call (batch size, steps, seconds) and every
finished job (seconds queued, seconds running), and `work()` splits the load into queued and running
requests and steps: the deployment turns both into Prometheus metrics, the library stays Ray-free. A job
submitted with `on_progress(step, total)` hears of each of its denoising steps: step-batched jobs after
each batcher step, whole-batch jobs from the model's step callback (in the worker thread, handed back to the
event loop), which is what streamed progress is made of.

`clock` (seconds, monotonic) and `run_blocking` (how a blocking call is run; default: a worker thread) are
injected, so tests drive the loop with fake models and a fake clock. Not thread-safe: one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from diffusionx.engine.monitor import TierMonitor

logger = logging.getLogger(__name__)

BatchFunction = Callable[..., list[Any]]  # (requests[, on_step=]) -> one result per request, in order
ProgressCallback = Callable[[int, int], None]  # (step, total steps) of one job
RunBlocking = Callable[..., Awaitable[Any]]  # (function, *args) -> awaitable of function(*args)

SUBMITTED, WAITING, RUNNING, DONE, CANCELLED = "submitted", "waiting", "running", "done", "cancelled"


class SteppedTicket(Protocol):
    result: Any
    error: BaseException | None
    steps_run: int

    @property
    def done(self) -> bool: ...


TicketT = TypeVar("TicketT", bound=SteppedTicket)


class StepEngine(Protocol[TicketT]):
    """What the loop needs of a step-level batcher (`diffusionx.sampling.step_batching.StepBatcher`)."""

    def add(self, request: Any, background: bool = False) -> TicketT: ...

    def promote(self, ticket: TicketT) -> bool: ...

    def background_work(self) -> tuple[int, int]: ...  # (samples, remaining steps) of background work

    @property
    def has_foreground(self) -> bool: ...

    def step(self) -> list[TicketT]: ...

    def cancel(self, ticket: TicketT) -> bool: ...

    def priorities(self) -> list[tuple[int, int]]: ...  # (key, remaining steps) in the order it steps

    @property
    def idle(self) -> bool: ...


class LoopObserver:
    """Hears what the loop does (default: nothing). A deployment subclasses it to export metrics."""

    def batch_ran(self, kind: str, batch_size: int, steps: int, elapsed_s: float) -> None:
        """One model call ran `steps` denoising steps (1 for a step-batcher step) for `batch_size` jobs."""

    def job_finished(self, kind: str, queue_s: float, run_s: float, ok: bool) -> None:
        """A job that ran ended: `queue_s` from submit to running, `run_s` from then to its result."""


@dataclass
class LoopWork:
    """A replica's load split into work waiting for the model and work the model is on."""

    queued_requests: int = 0
    queued_steps: int = 0
    running_requests: int = 0
    running_steps: int = 0


class JobSpec(NamedTuple):
    """What a tier hands the loop for one request (`submit(*spec)`): its kind, the request and its load."""

    kind: str
    request: Any
    steps: int  # the request's UNet calls on this tier (`diffusionx.policy.cost.request_cost`)


@dataclass(eq=False)
class Job:
    """One request inside the loop. `steps` is its denoising work, the unit of the tier's load."""

    kind: str
    request: Any
    steps: int
    submitted_at: float
    future: asyncio.Future = field(repr=False)
    state: str = SUBMITTED
    ticket: SteppedTicket | None = field(default=None, repr=False)  # step-batched jobs, once admitted
    steps_done: int = 0  # steps already taken off the monitor's queued_steps
    queued_s: float = 0.0  # step-batched jobs: seconds from submit to joining the step batcher
    on_progress: ProgressCallback | None = field(default=None, repr=False)  # (step, total) per step
    started_at: float | None = None  # clock when it started running
    background: bool = False  # speculative: never counted as load until promoted


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(function, *args)


class ModelLoop:
    def __init__(
        self,
        max_batch_size: int,
        *,
        monitor: TierMonitor | None = None,
        clock: Callable[[], float] = time.perf_counter,
        run_blocking: RunBlocking = _in_thread,
        on_change: Callable[[], None] | None = None,
        observer: LoopObserver | None = None,
        background_gate: Callable[[], bool] | None = None,
        background_poll_s: float = 0.01,
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} is not allowed: use an integer >= 1")
        self.max_batch_size = max_batch_size
        self.monitor = monitor or TierMonitor()
        self.monitor.max_batch_size = max_batch_size
        self._clock = clock
        self.clock = clock  # the loop's time source, for what keeps time beside it (e.g. speculations)
        self._run_blocking = run_blocking
        self.on_change: Callable[[], None] = on_change or (lambda: None)  # e.g. report the new load
        self.observer = observer or LoopObserver()
        # whether a step of background work alone may run now (e.g. `engine.host_share.HostIdle` on a CPU
        # replica); while it says no, the loop looks again every `background_poll_s`
        self.background_gate: Callable[[], bool] = background_gate or (lambda: True)
        self.background_poll_s = background_poll_s
        self._arrived = asyncio.Event()
        self._running: list[Job] = []  # the whole batch in the model right now
        self._functions: dict[str, BatchFunction] = {}
        self._step_kind: str | None = None
        self._stepper: StepEngine[Any] | None = None
        self._waiting: list[Job] = []
        self._stepping: dict[SteppedTicket, Job] = {}  # admitted step-batched jobs; bounded by the pool
        self._joining: list[Job] = []  # step-batched jobs being added to the batcher right now
        self._task: asyncio.Task | None = None

    # -- configuration -----------------------------------------------------------------------------------
    def register(self, kind: str, function: BatchFunction) -> None:
        """Jobs of `kind` run in whole batches: `function(requests)` returns one result per request."""
        self._functions[kind] = function

    def enable_step_batching(self, kind: str, stepper: StepEngine[Any]) -> None:
        """Jobs of `kind` (img2img requests) join `stepper` and run step by step instead of whole."""
        self._step_kind, self._stepper = kind, stepper

    @property
    def kinds(self) -> tuple[str, ...]:
        return (*self._functions, *([self._step_kind] if self._step_kind else []))

    # -- requests ------------------------------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        request: Any,
        steps: int,
        on_progress: ProgressCallback | None = None,
        background: bool = False,
    ) -> Job:
        """A job for `request`, counted as queued load (unless `background`); it runs once `release`d.
        `on_progress(step, total)` is called on the event loop after each of its denoising steps."""
        if kind not in self._functions and kind != self._step_kind:
            raise ValueError(f"kind={kind!r} is not registered: use one of {', '.join(self.kinds)}")
        if background and kind != self._step_kind:
            raise ValueError(f"kind={kind!r} cannot run in the background: only step-batched work can")
        job = Job(kind, request, steps, self._clock(), asyncio.get_running_loop().create_future())
        job.on_progress = on_progress
        job.background = background
        if not background:
            self.monitor.enqueue(steps)
        self.on_change()
        return job

    def promote(self, job: Job) -> bool:
        """A background job becomes foreground (someone waits for it): counted as load from now on with
        its remaining steps, and scheduled like a new request of those. False if it is not background."""
        if not job.background or job.state in (DONE, CANCELLED):
            return False
        job.background = False
        remaining = job.steps - job.steps_done
        self.monitor.enqueue(remaining)
        if job.state == RUNNING:  # in the step batcher, or being added to it (`_admit_stepped` promotes it)
            self.monitor.admit(1)
            if job.ticket is not None and self._stepper is not None:
                self._stepper.promote(job.ticket)
                self.monitor.pool = self._stepper.priorities()
        # a job still waiting is admitted as foreground work by `_admit_stepped`
        self._note_background()
        self.on_change()
        return True

    def release(self, jobs: Sequence[Job]) -> None:
        """Hands submitted jobs to the loop (cancelled ones are skipped) and wakes it."""
        for job in jobs:
            if job.state == SUBMITTED:
                job.state = WAITING
                self._waiting.append(job)
        self._arrived.set()  # a loop waiting on the background gate looks at once
        if self._waiting and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait(self, job: Job) -> Any:
        """The job's result (or its error raised); if the caller is cancelled, so is the job."""
        try:
            return await job.future
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    async def run(
        self, kind: str, request: Any, steps: int, on_progress: ProgressCallback | None = None
    ) -> Any:
        """submit + release + wait: what an in-process caller does."""
        job = self.submit(kind, request, steps, on_progress)
        self.release([job])
        return await self.wait(job)

    def cancel(self, job: Job) -> None:
        """The caller is gone: drop the job from the queue or the step pool and undo its load.

        A job inside a running whole batch cannot be stopped; its result is dropped when the batch ends
        (its load is released then, since the model really works on it until then)."""
        if job.state in (SUBMITTED, WAITING):
            if job.state == WAITING:
                self._waiting.remove(job)
            if not job.background:
                self.monitor.withdraw(job.steps)
        elif job.state == RUNNING and job.ticket is not None and self._stepper is not None:
            self._stepper.cancel(job.ticket)
            self._stepping.pop(job.ticket, None)
            self.monitor.pool = self._stepper.priorities()
            if not job.background:
                self.monitor.abandon(job.steps - job.steps_done)
            self._note_background()
        elif job.state == RUNNING:  # whole batch in flight, or being admitted to the step batcher
            if not job.future.done():
                job.future.cancel()
            return
        else:
            return
        job.state = CANCELLED
        if not job.future.done():
            job.future.cancel()
        self.on_change()

    def work(self) -> LoopWork:
        """Queued and running foreground requests and denoising steps (steps still to run) of this
        replica; background work is not load (`background_work`)."""
        running = [*self._running, *(job for job in self._stepping.values() if not job.background)]
        running_steps = sum(job.steps - job.steps_done for job in running)
        return LoopWork(
            queued_requests=self.monitor.queued,
            queued_steps=self.monitor.queued_steps - running_steps,
            running_requests=self.monitor.in_flight,
            running_steps=running_steps,
        )

    def background_work(self) -> tuple[int, int]:
        """(jobs, steps still to run) of the background work this replica holds, waiting or stepping."""
        held = (*self._waiting, *self._joining, *self._stepping.values())
        jobs = [job for job in held if job.background]
        return len(jobs), sum(job.steps - job.steps_done for job in jobs)

    def _note_background(self) -> None:
        self.monitor.background_requests, self.monitor.background_steps = self.background_work()

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or bool(self._joining) or bool(self._stepping)

    # -- the loop ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while self._waiting or self._stepping:
            try:
                if self._stepper is not None:
                    await self._admit_stepped()
                    others_wait = any(job.kind != self._step_kind for job in self._waiting)
                    # a step of background work alone never holds up a waiting whole batch, and runs
                    # only when the gate lets it
                    if self._stepping and (not others_wait or self._stepper.has_foreground):
                        if self._stepper.has_foreground or self.background_gate():
                            await self._step_once()
                        elif not others_wait:
                            await self._wait_for_arrival(self.background_poll_s)
                if any(job.kind != self._step_kind for job in self._waiting):
                    await self._run_whole_batch()
            except Exception as error:
                logger.exception("model loop failed; failing the jobs it held")
                for job in [*self._stepping.values(), *self._waiting]:
                    self._finish(job, error)
                self._stepping.clear()
                self._waiting.clear()

    async def _wait_for_arrival(self, timeout_s: float) -> None:
        """Until a job is released or `timeout_s` passes."""
        self._arrived.clear()
        with contextlib.suppress(asyncio.TimeoutError):  # Python 3.10's is not the builtin
            await asyncio.wait_for(self._arrived.wait(), timeout_s)

    def _finish(self, job: Job, outcome: Any) -> None:
        """Ends a running or waiting job with a result or an exception; releases its remaining load."""
        if job.state in (DONE, CANCELLED):
            return
        if job.background:
            pass  # never counted as load
        elif job.state == WAITING:
            self.monitor.withdraw(job.steps)
        else:
            self.monitor.progressed(job.steps - job.steps_done)
            self.monitor.completed(1)
            now = self._clock()
            started = job.started_at if job.started_at is not None else now
            ok = not isinstance(outcome, BaseException)
            self.observer.job_finished(job.kind, started - job.submitted_at, now - started, ok)
        job.steps_done = job.steps
        job.state = DONE
        if job.future.done():  # the caller is gone
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    def _take_batch(self) -> list[Job]:
        """The oldest waiting whole-batch job plus later ones of its kind, up to max_batch_size."""
        first = next(job for job in self._waiting if job.kind != self._step_kind)
        taken = [job for job in self._waiting if job.kind == first.kind][: self.max_batch_size]
        chosen = set(taken)
        self._waiting = [job for job in self._waiting if job not in chosen]
        return taken

    async def _run_whole_batch(self) -> None:
        jobs = self._take_batch()
        started = self._clock()
        for job in jobs:
            job.state = RUNNING
            job.started_at = started
        self.monitor.admit(len(jobs))
        self._running = jobs
        function = self._functions[jobs[0].kind]
        try:
            outcomes = await self._call(function, jobs)
        finally:
            self._running = []
        elapsed = self._clock() - started
        self.monitor.ran(len(jobs), max(job.steps for job in jobs), elapsed)
        self.observer.batch_ran(jobs[0].kind, len(jobs), max(job.steps for job in jobs), elapsed)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if hasattr(outcome, "timings_ms"):
                outcome.timings_ms["queue"] = round((started - job.submitted_at) * 1000.0, 3)
                outcome.timings_ms["batch_size"] = float(len(jobs))
            self._finish(job, outcome)
        self.on_change()

    async def _call(self, function: BatchFunction, jobs: list[Job]) -> list[Any]:
        """One model call for `jobs`; if it fails, each job alone, so an error reaches only its own job."""
        requests = [job.request for job in jobs]
        on_step = self._step_reporter(jobs)
        try:
            if on_step is None:
                results = await self._run_blocking(function, requests)
            else:
                results = await self._run_blocking(functools.partial(function, on_step=on_step), requests)
            if len(results) != len(jobs):
                raise RuntimeError(f"the model gave {len(results)} results for {len(jobs)} requests")
            return list(results)
        except Exception as error:
            if len(jobs) == 1:
                return [error]
        outcomes: list[Any] = []
        for job in jobs:
            outcomes.extend(await self._call(function, [job]))
        return outcomes

    def _step_reporter(self, jobs: list[Job]) -> Callable[[Sequence[Any], int, int], None] | None:
        """The model's step callback for a whole batch whose jobs want progress (None if none does).

        The model calls it from the worker thread with the requests of the group that stepped (a batch may
        run as several groups); each job hears of its own steps, on the event loop."""
        listening = [job for job in jobs if job.on_progress is not None]
        if not listening:
            return None
        loop = asyncio.get_running_loop()

        def on_step(group: Sequence[Any], step: int, total: int) -> None:
            for job in listening:
                if any(job.request is request for request in group):
                    loop.call_soon_threadsafe(job.on_progress, step, total)  # type: ignore[arg-type]

        return on_step

    async def _admit_stepped(self) -> None:
        joining = [job for job in self._waiting if job.kind == self._step_kind]
        if not joining:
            return
        self._waiting = [job for job in self._waiting if job.kind != self._step_kind]
        stepper = self._stepper
        assert stepper is not None
        for job in joining:
            job.state = RUNNING
        self.monitor.admit(sum(1 for job in joining if not job.background))
        backgrounds = [job.background for job in joining]  # as they join (a promotion may come meanwhile)

        def add_all() -> list[Any]:
            added: list[Any] = []
            for job, background in zip(joining, backgrounds, strict=True):
                try:
                    if background:
                        added.append(stepper.add(job.request, background=True))
                    else:
                        added.append(stepper.add(job.request))
                except Exception as error:
                    added.append(error)
            return added

        admitted_at = self._clock()
        for job in joining:
            job.started_at = admitted_at
        self._joining = joining
        try:
            added = await self._run_blocking(add_all)
        finally:
            self._joining = []
        for job, entry, background in zip(joining, added, backgrounds, strict=True):
            if isinstance(entry, BaseException):
                self._finish(job, entry)
            elif job.future.cancelled():  # the caller left while its request was being prepared
                stepper.cancel(entry)
                job.state = CANCELLED
                if not job.background:
                    self.monitor.abandon(job.steps)
            elif entry.done:  # strength 0: nothing to run
                self._finish(job, entry.result)
            else:
                job.ticket = entry
                job.queued_s = admitted_at - job.submitted_at
                self._stepping[entry] = job
                if background and not job.background:  # promoted while it was being added
                    stepper.promote(entry)
        self.monitor.pool = stepper.priorities()
        self._note_background()

    async def _step_once(self) -> None:
        stepper = self._stepper
        assert stepper is not None
        foreground = stepper.has_foreground
        started = self._clock()
        finished = await self._run_blocking(stepper.step)
        elapsed = self._clock() - started
        advanced = 0
        for ticket, job in list(self._stepping.items()):
            delta = ticket.steps_run - job.steps_done
            if delta > 0:
                advanced += 1
                job.steps_done = ticket.steps_run
                if not job.background:
                    self.monitor.progressed(delta)
                if job.on_progress is not None:
                    job.on_progress(ticket.steps_run, job.steps)
        if advanced:
            # a step of background work alone is not load, and it runs only when the background gate says
            # the host is idle: its time is the idle host's, faster than what a foreground step costs under
            # load, so it would teach the service model's step time (`monitor.step_time`) too low
            if foreground:
                self.monitor.ran(advanced, 1, elapsed)
            self.observer.batch_ran(self._step_kind or "", advanced, 1, elapsed)
        self.monitor.pool = stepper.priorities()
        for ticket in finished:
            done = self._stepping.pop(ticket) if ticket in self._stepping else None
            if done is None:  # cancelled while the step ran
                continue
            if ticket.error is not None:
                self._finish(done, ticket.error)
                continue
            result = ticket.result
            result.timings_ms["queue"] = round(done.queued_s * 1000.0, 3)
            result.timings_ms["batch_size"] = float(result.batch_size)
            self._finish(done, result)
        self._note_background()
        self.on_change()
