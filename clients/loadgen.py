"""`diffusionx loadgen`: replay a workload against a running server and record every request as CSV.

    diffusionx loadgen --url http://127.0.0.1:8000 --workload sessions --rate 0.5 --duration-s 60 --out runs/a
    diffusionx loadgen --url ... --workload finalize --ramp 0.2:2 --duration-s 120 --latency-target-ms 3000
    diffusionx loadgen --url ... --workload preview --trace trace.csv --time-scale 2

Arrivals (`clients.workload`): `--rate R` (Poisson), `--ramp A:B` (Poisson, rate linear from A to B over
the duration) or `--trace FILE` (arrival time in ms as each line's first field, other comma- or
space-separated fields ignored, lines in any order: replayed sorted by arrival, stretched by
`--time-scale`), within `--duration-s` and at most `--max-requests` requests sent.

Workloads, each arrival being:
- `preview`: one text-to-image preview of a held-out shapes prompt (kind `preview`).
- `sessions`: a person's session: `--rounds` previews (the first text-to-image, kind `preview`; the others
  edit the previous round's image toward the next prompt at the strength the server's edit predictor
  picks, or at `--edit-strength`, kind `edit`), each after a
  think time, then a think time and a finalize (kind `finalize`). Think times are log-normal with mean
  `--think-s` (see `workload.think_time_s`). Prompts evolve one change per round (`shapes.data`).
- `finalize`: one finalize of a preview made beforehand: `--preview-pool` previews are made first, not
  timed, and written to `setup_requests.csv`; arrivals refine them in turn, at the strength the server's
  predictor picks or at `--finalize-strength` (the router may still cut it under a latency target).

`--out DIR/requests.csv` has one row per request sent, whatever happened to it (columns `COLUMNS`):
`status` is the HTTP status, or the client error's name when there was none (e.g. `ConnectionFailed`);
fields a response did not carry are empty. `arrival_s` is when the request was sent, from the start;
`e2e_ms` from then to the answer (judging its image comes after and is not counted).
`quality` is the shapes judge's accuracy of the returned image against its prompt, when the server
serves the shapes models. No request is sent after `--duration-s` plus `--drain-s` (sessions in flight
finish their rounds until then); the run ends when every request sent has ended.

Only loopback URLs are allowed unless `--allow-remote`: a load generator aimed at someone else's server
by mistake is a denial of service.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import ipaddress
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from clients.client import AsyncDiffusionXClient, AsyncSession, Round
from clients.errors import DiffusionXError
from clients.results import GenerateResult, PreviewResult, RefineResult
from clients.workload import poisson_arrivals, ramp_arrivals, think_time_s, trace_arrivals
from diffusionx.experiments.outputs import bench_results_dir
from diffusionx.requests import Mode

logger = logging.getLogger(__name__)

COLUMNS = (
    "arrival_s",
    "kind",
    "status",
    "route",
    "strength_predicted",
    "strength_used",
    "num_inference_steps",
    "cloud_unet_calls",
    "edge_unet_calls",
    "expected_latency_ms",
    "e2e_ms",
    "quality",
    "session",  # sessions workload: the session's index (its rounds share it); empty otherwise
    "speculative",  # finalize: hit | promoted | miss | off (how the server's speculation served it)
)
WORKLOADS = ("sessions", "finalize", "preview")
DEFAULT_OUT = bench_results_dir("loadgen")


@dataclass
class LoadgenConfig:
    url: str
    workload: str
    arrivals: list[float]  # seconds from the start: requests (preview, finalize) or sessions
    duration_s: float
    max_requests: int = 1000
    drain_s: float = 60.0  # no request is sent after duration_s + drain_s
    rounds: int = 3  # previews per session
    think_s: float = 3.0  # mean think time between rounds
    edit_strength: float | None = None  # sessions: edits at this strength (None: the edit predictor's)
    latency_target_ms: float | None = None
    finalize_strength: float | None = None  # refine strength of every finalize (None: the server predicts)
    num_inference_steps: int | None = None  # finalize: full-schedule steps (server default if None)
    preview_pool: int = 16  # finalize workload: previews made beforehand
    seed: int = 0
    timeout_s: float = 300.0
    progress: bool = True
    mode: str = "diffusionx"  # sessions: how each round is made (see `_session`)
    speculation: str | None = None  # finalize: "off" bypasses the server's speculation (None: its default)


@dataclass
class Recorder:
    """Sends requests within the cap and the time limit, and keeps one row per request sent."""

    start: float
    max_requests: int
    stop_at_s: float
    judge: Callable[[Any, str], float] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    bar: Any = None
    sent: int = 0

    async def send(
        self, kind: str, prompt: str, call: Callable[[], Awaitable[Any]], session: int | str = ""
    ) -> Any:
        """Sends `call()` and records it; None when it failed or was not sent (cap or time reached)."""
        arrival_s = time.perf_counter() - self.start
        if self.sent >= self.max_requests or arrival_s >= self.stop_at_s:
            return None
        self.sent += 1
        row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
        row.update(arrival_s=round(arrival_s, 4), kind=kind, session=session)
        result = None
        try:
            result = await call()
            row["status"] = 200
        except DiffusionXError as error:
            row["status"] = error.status if error.status is not None else type(error).__name__
        except Exception as error:  # the run goes on; the row says what happened
            row["status"] = type(error).__name__
        # the latency ends with the answer: judging its image is the bench's work, not the server's
        row["e2e_ms"] = round((time.perf_counter() - self.start - arrival_s) * 1000.0, 2)
        if result is not None:
            row.update(describe(result))
            if self.judge is not None:
                try:
                    row["quality"] = round(self.judge(result, prompt), 4)
                except Exception as error:  # the answer stands; only its quality is missing
                    logger.warning("could not judge the image of a %s: %r", kind, error)
        self.rows.append(row)
        if self.bar is not None:
            self.bar.update(1)
        return result if row["status"] == 200 else None


def describe(result: Any) -> dict[str, Any]:
    """The CSV fields a preview (or session round) or refine result carries."""
    if isinstance(result, Round):
        result = result.result
    calls = result.unet_calls
    fields: dict[str, Any] = {
        "num_inference_steps": result.num_inference_steps,
        "cloud_unet_calls": calls.get("cloud", 0),
        "edge_unet_calls": calls.get("edge", 0),
    }
    if isinstance(result, GenerateResult):
        fields["route"] = result.parameters.get("route") or result.mode
    if isinstance(result, PreviewResult):
        fields["strength_used"] = "" if result.strength is None else result.strength
    if isinstance(result, RefineResult):
        fields.update(
            route=result.route,
            strength_predicted=result.strength_predicted,
            strength_used=result.strength_used,
            expected_latency_ms=""
            if result.expected_latency_ms is None
            else round(result.expected_latency_ms, 2),
            speculative=result.speculative,
        )
    return fields


def shapes_judge() -> Callable[[Any, str], float]:
    """Judge accuracy of a result's image against its prompt (imported only when the shapes models run)."""
    from diffusionx.shapes.judge import score

    def judge(result: Any, prompt: str) -> float:
        image = result.image
        return score(image, prompt)["accuracy"]

    return judge


def clip_judge(alignment_model: str) -> Callable[[Any, str], float]:
    """CLIPScore of a result's image against its prompt, for servers whose models no judge reads; loads the
    alignment model in this process (imports torch: only where a quality column is asked for)."""
    from diffusionx.models.alignment import clip_score, load_alignment_model

    model = load_alignment_model(alignment_model)

    def judge(result: Any, prompt: str) -> float:
        return clip_score(model, [result.image], [prompt])[0]

    return judge


def check_loopback(url: str) -> None:
    """Raises ValueError unless `url` points at this machine."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(
        f"--url {url!r} is not a loopback address (127.0.0.0/8, ::1, localhost); pass --allow-remote to "
        "load a server on another machine you are responsible for"
    )


def planned_requests(config: LoadgenConfig) -> int:
    per_arrival = config.rounds + 1 if config.workload == "sessions" else 1
    return min(config.max_requests, len(config.arrivals) * per_arrival)


def workload_prompts(workload: str, n: int, rounds: int, seed: int) -> list[list[str]]:
    """Prompt sequences: `rounds` per session, or one per request (held-out shapes captions)."""
    from diffusionx.shapes.data import heldout_prompts, make_sessions

    if workload == "sessions":
        return make_sessions(n, rounds, seed)
    return [[prompt] for prompt in heldout_prompts(n, seed)]


async def _session(
    client: AsyncDiffusionXClient,
    recorder: Recorder,
    config: LoadgenConfig,
    index: int,
    prompts: list[str],
) -> None:
    rng = random.Random(config.seed * 1_000_003 + index)
    if config.mode != "diffusionx":  # every round is the mode's one-shot image; the last one is kept
        for number, prompt in enumerate(prompts):
            if number:
                await asyncio.sleep(think_time_s(config.think_s, rng))
            kind = "finalize" if number == len(prompts) - 1 else "preview"
            seed = config.seed + index

            def call(p: str = prompt, s: int = seed) -> Awaitable[Any]:
                return client.generate(
                    p, seed=s, mode=config.mode, num_inference_steps=config.num_inference_steps
                )

            if await recorder.send(kind, prompt, call, index) is None:
                return
        return
    session = client.session(seed=config.seed + index)
    for number, prompt in enumerate(prompts):
        if number:
            await asyncio.sleep(think_time_s(config.think_s, rng))
        kind = "preview" if number == 0 else "edit"

        def round_(p: str = prompt, edit: bool = number > 0) -> Awaitable[Any]:
            return session.preview(p, config.edit_strength if edit else None, edit=edit)

        if await recorder.send(kind, prompt, round_, index) is None:
            return  # a failed round ends the session, as it would for a person
    await asyncio.sleep(think_time_s(config.think_s, rng))
    await recorder.send("finalize", prompts[-1], lambda: _finalize(session, config), index)


def _finalize(session: AsyncSession, config: LoadgenConfig) -> Awaitable[RefineResult]:
    return session.finalize(
        config.finalize_strength,
        latency_target_ms=config.latency_target_ms,
        num_inference_steps=config.num_inference_steps,
        speculation=config.speculation,
    )


async def _make_previews(
    client: AsyncDiffusionXClient, config: LoadgenConfig, prompts: list[str], setup: Recorder
) -> list[tuple[AsyncSession, str]]:
    """The finalize workload's previews, made before the timed run (recorded in `setup`)."""
    made = []
    for index, prompt in enumerate(prompts):
        session = client.session(seed=config.seed + index)
        if await setup.send("preview", prompt, functools.partial(session.preview, prompt)) is not None:
            made.append((session, prompt))
    if not made:
        raise DiffusionXError(f"none of the {len(prompts)} setup previews succeeded: {setup.rows[:1]}")
    return made


async def run_loadgen(
    config: LoadgenConfig, transport: Any = None, judge: Callable[[Any, str], float] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Runs the workload; returns (rows of the timed requests, rows of the finalize workload's setup).

    `transport` replaces the network (tests pass an `httpx.MockTransport`); `judge(result, prompt)`
    scores images (None: no quality).
    """
    if config.workload not in WORKLOADS:
        raise ValueError(f"workload={config.workload!r} is not allowed: use one of {', '.join(WORKLOADS)}")
    n = len(config.arrivals)
    pool = min(config.preview_pool, max(1, n))
    prompt_sets = workload_prompts(
        config.workload, pool if config.workload == "finalize" else n, config.rounds, config.seed
    )
    # no client retries: each arrival's own answer (a 503 included) is what is recorded
    async with AsyncDiffusionXClient(
        config.url, config.timeout_s, max_retries=0, transport=transport, max_connections=1000
    ) as client:
        setup_rows: list[dict[str, Any]] = []
        previews: list[tuple[AsyncSession, str]] = []
        if config.workload == "finalize":
            setup = Recorder(time.perf_counter(), pool, float("inf"), None)
            previews = await _make_previews(client, config, [p[0] for p in prompt_sets], setup)
            setup_rows = setup.rows
        bar = tqdm(total=planned_requests(config), unit="req", disable=not config.progress)
        recorder = Recorder(
            time.perf_counter(), config.max_requests, config.duration_s + config.drain_s, judge, bar=bar
        )
        tasks: list[asyncio.Task] = []
        for index, arrival_s in enumerate(config.arrivals):
            delay = arrival_s - (time.perf_counter() - recorder.start)
            if delay > 0:
                await asyncio.sleep(delay)
            if recorder.sent >= config.max_requests:
                break
            if config.workload == "sessions":
                job = _session(client, recorder, config, index, prompt_sets[index])
            elif config.workload == "preview":
                prompt = prompt_sets[index][0]
                seed = config.seed + index
                job = recorder.send("preview", prompt, functools.partial(client.preview, prompt, seed=seed))
            else:
                session, prompt = previews[index % len(previews)]
                job = recorder.send("finalize", prompt, functools.partial(_finalize, session, config))
            tasks.append(asyncio.create_task(job))
            bar.set_postfix(sent=recorder.sent, refresh=False)
        await asyncio.gather(*tasks)
        bar.close()
    return recorder.rows, setup_rows


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["arrival_s"]))
    return path


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for kind in ("preview", "edit", "finalize"):
        mine = [row for row in rows if row["kind"] == kind]
        if not mine:
            continue
        statuses = Counter(str(row["status"]) for row in mine)
        ok = [row["e2e_ms"] for row in mine if row["status"] == 200]
        p50 = f"{median(ok):.0f} ms" if ok else "-"
        routes = Counter(row["route"] for row in mine if row["route"])
        lines.append(
            f"{kind:<9} {len(mine):>5} sent  status {dict(statuses)}  e2e p50 {p50}"
            + (f"  routes {dict(routes)}" if routes else "")
        )
    return lines


def _ramp(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ramp {text!r}: use START:END in requests per second") from None
    return start, end


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="diffusionx loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="server to load (loopback only unless --allow-remote)")
    parser.add_argument("--workload", choices=WORKLOADS, default="sessions", help="what each arrival is")
    arrivals = parser.add_mutually_exclusive_group(required=True)
    arrivals.add_argument("--rate", type=float, help="Poisson arrivals per second")
    arrivals.add_argument("--ramp", type=_ramp, help="A:B, Poisson with the rate linear from A to B")
    arrivals.add_argument(
        "--trace",
        help="trace file: arrival time in ms as each line's first field (e.g. DiffServe's "
        "trace_1to8qps.txt); lines in any order, replayed sorted by arrival",
    )
    parser.add_argument("--time-scale", type=float, default=1.0, help="stretch the trace's times by F")
    parser.add_argument("--duration-s", type=float, default=60.0, help="arrivals within this (default 60)")
    parser.add_argument("--max-requests", type=int, default=1000, help="requests sent at most (default 1000)")
    parser.add_argument("--drain-s", type=float, default=60.0, help="no request sent after duration + this")
    parser.add_argument("--rounds", type=int, default=3, help="sessions: previews per session (default 3)")
    parser.add_argument("--think-s", type=float, default=3.0, help="sessions: mean think time (log-normal)")
    parser.add_argument(
        "--edit-strength", type=float, help="sessions: strength of edit rounds (default: predicted)"
    )
    parser.add_argument("--latency-target-ms", type=float, help="finalize: the router's latency target")
    parser.add_argument(
        "--finalize-strength", type=float, help="refine strength of every finalize (default: predicted)"
    )
    parser.add_argument("--num-inference-steps", type=int, help="finalize: full-schedule steps")
    parser.add_argument("--preview-pool", type=int, default=16, help="finalize: previews made beforehand")
    parser.add_argument(
        "--mode",
        choices=[mode.value for mode in Mode],
        default="diffusionx",
        help="sessions: diffusionx previews on the edge then finalizes; any other mode makes every round "
        "with POST /v1/generate in that mode (the last round is the kept image, kind finalize)",
    )
    parser.add_argument(
        "--speculation",
        choices=("on", "off"),
        help="finalize: off bypasses the server's speculative refinement (default: the server's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="arrivals, prompts, image seeds")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="client timeout per request")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("rounds", "max_requests", "preview_pool"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: at least 1")
    for name in ("edit_strength", "finalize_strength"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            parser.error(f"--{name.replace('_', '-')} {value}: use a value in [0, 1]")
    if args.time_scale != 1.0 and not args.trace:
        parser.error("--time-scale only applies to --trace")
    if not args.allow_remote:
        try:
            check_loopback(args.url)
        except ValueError as error:
            parser.error(str(error))
    return args


def arrivals_from_args(args: argparse.Namespace) -> list[float]:
    rng = random.Random(args.seed)
    if args.rate is not None:
        return poisson_arrivals(args.rate, args.duration_s, args.max_requests, rng)
    if args.ramp is not None:
        start_rate, end_rate = args.ramp
        return ramp_arrivals(start_rate, end_rate, args.duration_s, args.max_requests, rng)
    trace = trace_arrivals(args.trace, args.time_scale, args.duration_s, args.max_requests)
    if trace.out_of_order:
        print(
            f"loadgen: note: {trace.out_of_order} of the {trace.lines} arrivals in {args.trace} are out of "
            "time order (earlier than a line above them); replaying them sorted by arrival time",
            file=sys.stderr,
        )
    return trace.arrivals


async def _serves_shapes(url: str, timeout_s: float) -> bool:
    async with AsyncDiffusionXClient(url, timeout_s) as client:
        health = (await client.health()).details
    return (health.get("cloud") or {}).get("family") == "shapes"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        arrivals = arrivals_from_args(args)
        judge = shapes_judge() if asyncio.run(_serves_shapes(args.url, args.timeout_s)) else None
        config = LoadgenConfig(
            url=args.url,
            workload=args.workload,
            arrivals=arrivals,
            duration_s=args.duration_s,
            max_requests=args.max_requests,
            drain_s=args.drain_s,
            rounds=args.rounds,
            think_s=args.think_s,
            edit_strength=args.edit_strength,
            latency_target_ms=args.latency_target_ms,
            finalize_strength=args.finalize_strength,
            num_inference_steps=args.num_inference_steps,
            preview_pool=args.preview_pool,
            seed=args.seed,
            timeout_s=args.timeout_s,
            progress=not args.no_progress,
            mode=args.mode,
            speculation=args.speculation,
        )
        print(
            f"loadgen: {len(arrivals)} {args.workload} arrivals over {args.duration_s:g} s against {args.url}"
            + ("" if judge else " (no quality: the server does not serve the shapes models)"),
            flush=True,
        )
        rows, setup_rows = asyncio.run(run_loadgen(config, judge=judge))
    except (ValueError, OSError) as error:
        print(f"loadgen: {error}", file=sys.stderr)
        return 2
    except DiffusionXError as error:
        print(f"loadgen failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    paths = [write_rows(rows, out / "requests.csv")]
    if setup_rows:
        paths.append(write_rows(setup_rows, out / "setup_requests.csv"))
    print("\n".join(summary_lines(rows)))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
