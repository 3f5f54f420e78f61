"""`diffusionx predictor label`: measured labels for the learned strength predictors.

Algorithm, per shapes session (`shapes.data.make_session_steps`: evolving prompts, one change per round),
through the served workflows on in-process tiers (`workflows.local`), image seed = `--image-seed` + index:
1. round 0: an edge preview of the first prompt;
2. every later round: edit the previous image toward the new prompt at every strength of `EDIT_GRID`,
   judge each edit (`targets.edit_ok`), label the round with the smallest ok strength, and carry one edit
   on as the session's image: with `--carry predicted` (the default) the one the shipped edit predictor
   picks, as the server would show it; with `--carry smallest-ok` the label's (the best cheap edit).
   The carry decides which previews the refine labels see. `smallest-ok` carries only edits that went
   right, so the refine predictor never saw the wrong previews that served sessions end on when an edit
   misses (about one edit in six), and learned to refine them at 0.05-0.1, which keeps them wrong;
3. finalize: a full cloud generation of the final prompt and seed sets the session's quality bar; refine
   the final preview at ascending `REFINE_GRID` strengths until one reaches it (`targets.refine_reached`;
   the strengths above the first that does are not run: the label needs only the smallest).
Each refinement records its cloud `unet_calls` and judge scores. Sessions run `--concurrency` at a time,
so the tiers batch their requests as the server does. One JSON object per session is appended to the
dataset file (JSON lines) as soon as its chunk is done; a rerun skips the sessions already in the file, so
an interrupted run resumes where it stopped.

    diffusionx predictor label --sessions 256 --out runs/predictor/labels.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from diffusionx import imaging
from diffusionx.experiments.evaluation import add_run_options, load_pair
from diffusionx.experiments.predictor.targets import (
    EDIT_GRID,
    REFINE_GRID,
    edit_ok,
    refine_reached,
    smallest,
)
from diffusionx.policy.learned import load_predictor
from diffusionx.requests import Img2ImgRequest, PreviewRequest
from diffusionx.shapes.data import SessionStep, make_session_steps
from diffusionx.shapes.judge import score
from diffusionx.workflows import modes
from diffusionx.workflows.local import local_tiers
from diffusionx.workflows.modes import Tiers

DEFAULT_OUT = "runs/predictor/labels.jsonl"
LABEL_SESSION_SEED = 0  # session prompts: make_session_steps(seed=0); `predictor eval` uses other seeds
LABEL_IMAGE_SEED = 10_000


def _png(image: Image.Image) -> str:
    return imaging.encode_png_base64(image)


def _scores(image: Image.Image, prompt: str) -> dict[str, float]:
    return {key: round(value, 6) for key, value in score(image, prompt).items()}


CARRY_CHOICES = ("predicted", "smallest-ok")
EditStrength = Callable[[str, Image.Image, str | None], float]


def _carried(grid_label: float, predicted: float | None) -> float:
    """The grid strength whose edit carries on: the predictor's pick (snapped to the grid), else the label."""
    if predicted is None:
        return grid_label
    return min(EDIT_GRID, key=lambda s: abs(s - predicted))


async def label_session(
    tiers: Tiers,
    index: int,
    steps: Sequence[SessionStep],
    seed: int,
    carry: EditStrength | None = None,
) -> dict[str, Any]:
    """Labels one session (see the module docstring); returns its dataset record. `carry` picks the edit
    that carries on (None: the smallest ok one)."""
    # 1. round 0: edge preview
    image = (await modes.preview(tiers, PreviewRequest(steps[0].prompt, seed))).image
    previous_prompt = steps[0].prompt
    edits = []
    # 2. later rounds: every edit strength of the grid from the same previous image
    for number, step in enumerate(steps[1:], start=1):
        previous_scores = _scores(image, previous_prompt)
        results = await asyncio.gather(
            *(modes.edit(tiers, Img2ImgRequest(step.prompt, image, s, seed=seed)) for s in EDIT_GRID)
        )
        trials: list[dict[str, Any]] = []
        for strength, result in zip(EDIT_GRID, results, strict=True):
            scores = _scores(result.image, step.prompt)
            ok = edit_ok(scores, previous_scores, step.change or "")
            trials.append({"strength": strength, "edge_calls": result.unet_calls.edge, "ok": ok, **scores})
        label, reached = smallest(EDIT_GRID, [t["ok"] for t in trials])
        predicted = None if carry is None else carry(step.prompt, image, previous_prompt)
        carried = _carried(label, predicted)
        edits.append(
            {
                "round": number,
                "previous_prompt": previous_prompt,
                "prompt": step.prompt,
                "change": step.change,
                "image": _png(image),
                "trials": trials,
                "label": label,
                "reached": reached,
                "carried": carried,
            }
        )
        image, previous_prompt = results[EDIT_GRID.index(carried)].image, step.prompt
    # 3. finalize: the cloud's full generation sets the bar; ascending strengths until one reaches it
    prompt = steps[-1].prompt
    cloud = (await modes.generate(tiers, "cloud", PreviewRequest(prompt, seed))).result
    cloud_scores = _scores(cloud.image, prompt)
    trials = []
    for strength in REFINE_GRID:
        final = await modes.refine(tiers, prompt, image, seed=seed, strength=strength)
        scores = _scores(final.result.image, prompt)
        trials.append({"strength": strength, "cloud_calls": final.result.unet_calls.cloud, **scores})
        if refine_reached(scores["accuracy"], cloud_scores["accuracy"]):
            break
    label, reached = smallest(
        REFINE_GRID, [refine_reached(t["accuracy"], cloud_scores["accuracy"]) for t in trials]
    )
    return {
        "session": index,
        "seed": seed,
        "prompts": [step.prompt for step in steps],
        "changes": [step.change for step in steps[1:]],
        "edits": edits,
        "refine": {
            "prompt": prompt,
            "previous_prompt": steps[-2].prompt if len(steps) > 1 else None,
            "image": _png(image),
            "preview_scores": _scores(image, prompt),
            "cloud": {"cloud_calls": cloud.unet_calls.cloud, **cloud_scores},
            "trials": trials,
            "label": label,
            "reached": reached,
        },
    }


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The dataset's records; a torn last line (an interrupted write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def label_sessions(
    tiers: Tiers,
    out: str | Path,
    n_sessions: int,
    rounds: int,
    *,
    session_seed: int = LABEL_SESSION_SEED,
    image_seed: int = LABEL_IMAGE_SEED,
    concurrency: int = 32,
    carry: EditStrength | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Labels sessions 0..n_sessions-1 that `out` does not hold yet, appending each chunk; returns all.
    `carry` picks each round's carried edit (None: the smallest ok one); name it in `settings`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"rounds": rounds, "session_seed": session_seed, "image_seed": image_seed, **(settings or {})}
    done = read_records(out)
    for record in done[:1]:
        if record.get("settings") != settings:
            raise ValueError(
                f"{out} holds labels made with {record.get('settings')}, not {settings}; "
                "use another --out or the same settings"
            )
    have = {record["session"] for record in done}
    sessions = make_session_steps(n_sessions, rounds, seed=session_seed)
    todo = [i for i in range(n_sessions) if i not in have]
    with (
        tqdm(
            total=n_sessions,
            initial=n_sessions - len(todo),
            desc="label",
            unit="session",
            file=sys.stderr,
            disable=not progress,
        ) as bar,
        out.open("a") as handle,
    ):
        for begin in range(0, len(todo), concurrency):
            chunk = todo[begin : begin + concurrency]

            async def run(chunk: list[int] = chunk) -> list[dict[str, Any]]:
                return list(
                    await asyncio.gather(
                        *(label_session(tiers, i, sessions[i], image_seed + i, carry) for i in chunk)
                    )
                )

            for record in asyncio.run(run()):
                record["settings"] = settings
                handle.write(json.dumps(record) + "\n")
                done.append(record)
            handle.flush()
            bar.update(len(chunk))
    return sorted(done, key=lambda r: r["session"])


def summary(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    refine = [r["refine"] for r in records]
    edits = [e for r in records for e in r["edits"]]
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    return {
        "sessions": len(records),
        "refine_label_mean": mean([r["label"] for r in refine]),
        "refine_reached": mean([float(r["reached"]) for r in refine]),
        "edit_rounds": len(edits),
        "edit_label_mean": mean([e["label"] for e in edits]),
        "edit_reached": mean([float(e["reached"]) for e in edits]),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionx predictor label",
        description="Label shapes sessions: the smallest refine and edit strengths that reach the targets.",
    )
    parser.add_argument("--sessions", type=int, default=256, help="sessions to label (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="prompts per session (default 3)")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"dataset file, JSON lines (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--carry",
        choices=CARRY_CHOICES,
        default="predicted",
        help="which edit carries on to the next round: the shipped edit predictor's pick, as served "
        "(default), or the smallest ok one",
    )
    parser.add_argument(
        "--edit-predictor",
        default="shapes-edit",
        help="with --carry predicted: the edit predictor (a shipped name or a path; default shapes-edit)",
    )
    add_session_options(parser)
    return parser


def add_session_options(parser: argparse.ArgumentParser) -> None:
    """Options `predictor label` and `predictor eval` share: concurrency, the model pair, run options."""
    parser.add_argument("--concurrency", type=int, default=32, help="sessions in flight at once")
    parser.add_argument("--cloud", default="shapes-cloud", help="cloud model (default shapes-cloud)")
    parser.add_argument("--edge", default="shapes-edge", help="edge model (default shapes-edge)")
    add_run_options(parser)


def check_session_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses session counts below 1 and sessions too short to hold an edit, naming what is allowed."""
    for name in ("sessions", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is not allowed: use an integer >= 1")
    if args.rounds < 2:
        parser.error(f"--rounds={args.rounds} is not allowed: a session needs >= 2 rounds to have an edit")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_session_args(parser, args)
    start = time.perf_counter()
    cloud, edge = load_pair("diffusionx", args.cloud, args.edge, args.device)
    tiers = local_tiers(cloud, edge, max_batch_size=64)
    carry = load_predictor(args.edit_predictor) if args.carry == "predicted" else None
    carried = {"carry": args.carry} | ({"edit_predictor": args.edit_predictor} if carry else {})
    try:
        records = label_sessions(
            tiers,
            args.out,
            args.sessions,
            args.rounds,
            concurrency=args.concurrency,
            carry=carry,
            settings={"cloud": args.cloud, "edge": args.edge, **carried},
            progress=not args.no_progress,
        )
    except ValueError as error:  # the file holds labels made with other settings
        parser.error(str(error))
    print(
        json.dumps(
            {"out": str(args.out), "seconds": round(time.perf_counter() - start, 1), **summary(records)}
        )
    )
    return 0
