"""`diffusionx demo`: start the embedded application locally, run a scripted multi-round session through the
HTTP client, write every image and a summary, shut down.

Steps:
  1. start Ray Serve on the embedded CPU config (`deployments.local.start_local_app`), or use `--url`;
  2. run SCRIPT: four preview rounds evolving a shapes-world prompt (change a colour, move, add a shape),
     two of them as edits of the previous round's image at the strength the server's edit predictor picks;
  3. finalize: the strength predictor and router pick strength and steps, the cloud tier refines;
  4. for comparison, one `/v1/generate` of the final prompt per other mode (cloud, edge, hybrid, ec-diff);
  5. write round_N.png, final.png, generate_<mode>.png, summary.json and summary.md into `--out`;
  6. shut Ray down, also on error or Ctrl-C.

Images are scored with the shapes judge (`diffusionx.shapes.judge`: does the image show the caption?);
on tiny-random models (used until the embedded weights exist) the images are noise and the scores low.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from clients.client import DiffusionXClient, Session
from clients.errors import DiffusionXError
from diffusionx.requests import Mode

DEFAULT_OUT = "demo_output"
COMPARE_MODES: tuple[str, ...] = tuple(mode.value for mode in Mode if mode is not Mode.DIFFUSIONX)
TINY_MODELS = {"edge_model": "tiny-random-edge", "cloud_model": "tiny-random"}


@dataclass(frozen=True)
class ScriptedRound:
    prompt: str
    edit: bool  # False: a fresh preview (same seed); True: an edit of the previous image (predicted strength)
    change: str  # what the user changed, for the summary


SCRIPT: tuple[ScriptedRound, ...] = (
    ScriptedRound("a large red circle on the left, blue background", False, "first prompt"),
    ScriptedRound("a large green circle on the left, blue background", True, "colour (edit)"),
    ScriptedRound("a large green circle on the right, blue background", False, "move"),
    ScriptedRound(
        "a large green circle on the right and a small yellow square on the left, blue background",
        True,
        "add a shape (edit)",
    ),
)


def judge_score(image: Image.Image, prompt: str) -> float | None:
    """Judge accuracy (mean of kind, colour, size, position, background matches) or None if unscorable."""
    from diffusionx.shapes import judge  # imports the library (torch); the client itself does not

    try:
        return round(judge.score(image, prompt)["accuracy"], 3)
    except ValueError:  # not a shapes caption
        return None


def run_session(
    client: DiffusionXClient,
    out_dir: Path,
    summary: dict[str, Any],
    script: tuple[ScriptedRound, ...] = SCRIPT,
    seed: int = 0,
    compare_modes: tuple[str, ...] = COMPARE_MODES,
    log: Any = print,
) -> dict[str, Any]:
    """Runs `script` as one session plus the comparison generations and saves the images under `out_dir`.

    Fills `summary` as it goes (`seed`, `rounds`, `final`, `compare`), so that after a failure it still
    holds what was done; returns it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    session: Session = client.session(seed=seed)
    rounds: list[dict[str, Any]] = []
    compare: list[dict[str, Any]] = []
    summary.update(seed=seed, rounds=rounds, final=None, compare=compare)
    for number, step in enumerate(script, start=1):
        kind = f"edit of round {number - 1}" if step.edit else "preview"
        log(f"round {number}/{len(script)} [{kind}] {step.prompt!r}")
        round_ = session.preview(step.prompt, edit=step.edit)
        path = out_dir / f"round_{number}.png"
        round_.image.save(path)
        info = {**round_.summary(), "change": step.change, "file": path.name}
        info["judge_accuracy"] = judge_score(round_.image, step.prompt)
        rounds.append(info)
        resent = " (preview id expired: image resent)" if round_.resent_image else ""
        strength = ""
        if round_.edit_strength is not None:
            how = " predicted" if round_.edit_predicted else ""
            strength = f", edit strength {round_.edit_strength:.2f}{how}"
        log(f"  -> {path} in {round_.result.latency_ms:.0f} ms{strength}{resent}")

    log(f"finalize {session.last.prompt!r}")
    final = session.finalize()
    final_path = out_dir / "final.png"
    final.image.save(final_path)
    summary_final = session.summary()["final"]
    summary_final.update(file=final_path.name, judge_accuracy=judge_score(final.image, session.last.prompt))
    summary["final"] = summary_final
    log(
        f"  -> {final_path}: route {final.route}, strength {final.strength_predicted:.2f} predicted / "
        f"{final.strength_used:.2f} used, {final.num_inference_steps} steps, {final.latency_ms:.0f} ms"
    )

    for mode in compare_modes:
        entry: dict[str, Any] = {"mode": mode}
        try:
            result = client.generate(session.last.prompt, seed=seed, mode=mode)
        except DiffusionXError as error:  # e.g. a mode the server does not serve yet
            entry["error"] = str(error)
            log(f"generate [{mode}]: {error}")
        else:
            path = out_dir / f"generate_{mode}.png"
            result.image.save(path)
            entry.update(
                num_inference_steps=result.num_inference_steps,
                unet_calls=result.unet_calls,
                timings_ms=result.timings_ms,
                latency_ms=round(result.latency_ms, 2),
                parameters=result.parameters,
                file=path.name,
                judge_accuracy=judge_score(result.image, session.last.prompt),
            )
            log(f"generate [{mode}] -> {path} in {result.latency_ms:.0f} ms, unet_calls {result.unet_calls}")
        compare.append(entry)
    return summary


def _calls(unet_calls: dict[str, int] | None) -> str:
    if not unet_calls:
        return "-"
    return f"{unet_calls.get('cloud', 0)}/{unet_calls.get('edge', 0)}/{unet_calls.get('approximated', 0)}"


def _num(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_markdown(summary: dict[str, Any]) -> str:
    """summary.md: models, the rounds, the final refinement and the mode comparison as tables."""
    models = summary.get("models", {})
    edge, cloud, note = models.get("edge", "?"), models.get("cloud", "?"), models.get("note", "")
    lines = [
        "# DiffusionX demo",
        "",
        f"Models: edge `{edge}`, cloud `{cloud}`. {note}",
        f"Server: {summary.get('url', '?')}; seed {summary['seed']}; "
        f"total {_num(summary.get('total_s'), 1)} s.",
        "",
        "UNet calls are cloud/edge/approximated. Times in ms: `model` is the server's model time, `e2e` the",
        "client's end-to-end HTTP time. Judge: shapes-judge accuracy of the image against its prompt (0-1).",
        "",
    ]
    if summary.get("error"):
        lines += [f"**The run stopped early:** {summary['error']}", ""]
    lines += [
        "## Rounds",
        "",
        "| # | change | prompt | edit strength | steps | UNet calls | model | queue | e2e | judge | image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rounds"]:
        t = r.get("timings_ms", {})
        edit = "-" if r.get("edit_strength") is None else f"{r['edit_strength']:.2f}"
        if r.get("edit_predicted"):
            edit += " (predicted)"
        if r.get("resent_image"):
            edit += " (image resent)"
        lines.append(
            f"| {r['round']} | {r.get('change', '')} | {r['prompt']} | {edit} | {r['num_inference_steps']} "
            f"| {_calls(r.get('unet_calls'))} | {_num(t.get('model_total'))} | {_num(t.get('queue'))} "
            f"| {_num(r.get('latency_ms'))} | {_num(r.get('judge_accuracy'), 2)} | {r.get('file', '')} |"
        )
    f = summary.get("final")
    if f:
        t = f.get("timings_ms", {})
        lines += [
            "",
            "## Final",
            "",
            f"Prompt: {f['prompt']}",
            "",
            "| route | strength predicted | strength used | steps | UNet calls | model | e2e | judge "
            "| image |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {f['route']} | {f['strength_predicted']:.3f} | {f['strength_used']:.3f} "
            f"| {f['num_inference_steps']} | {_calls(f.get('unet_calls'))} | {_num(t.get('model_total'))} "
            f"| {_num(f.get('latency_ms'))} | {_num(f.get('judge_accuracy'), 2)} | {f.get('file', '')} |",
            "",
            f"Router: {f.get('reason', '')}",
        ]
    if summary.get("compare"):
        lines += [
            "",
            "## Same prompt, other modes (`/v1/generate`)",
            "",
            "| mode | steps | UNet calls | e2e | judge | image / error |",
            "|---|---|---|---|---|---|",
        ]
        for c in summary["compare"]:
            if "error" in c:
                lines.append(f"| {c['mode']} | - | - | - | - | {c['error']} |")
                continue
            lines.append(
                f"| {c['mode']} | {c['num_inference_steps']} | {_calls(c.get('unet_calls'))} "
                f"| {_num(c.get('latency_ms'))} | {_num(c.get('judge_accuracy'), 2)} | {c.get('file', '')} |"
            )
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Writes summary.json and summary.md into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    json_path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    md_path.write_text(format_markdown(summary))
    return json_path, md_path


def describe_models(health: dict[str, Any], requested: dict[str, str], embedded: bool) -> dict[str, Any]:
    """Which models the server runs (as its /v1/health says, else as requested), with a note for people."""
    edge = (health.get("edge") or {}).get("model") or requested.get("edge_model", "shapes-edge")
    cloud = (health.get("cloud") or {}).get("model") or requested.get("cloud_model", "shapes-cloud")
    if edge.startswith("tiny-random") and not embedded:
        note = (
            "The embedded shapes weights are not built yet, so this runs the tiny-random test models: "
            "images are noise and judge scores are meaningless (build them with `diffusionx train-shapes`)."
        )
    elif edge.startswith("shapes-"):
        note = "The embedded shapes-world models."
    else:
        note = ""
    return {"edge": edge, "cloud": cloud, "embedded_weights": embedded, "note": note}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="diffusionx demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT}/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every round (default 0)")
    parser.add_argument("--url", help="use an already running server instead of starting one")
    parser.add_argument("--config", help="serve config YAML (default: the embedded CPU application)")
    parser.add_argument("--port", type=int, default=8000, help="port of the local application (default 8000)")
    parser.add_argument("--edge-model", help="edge model override (registry name, hub id or local path)")
    parser.add_argument("--cloud-model", help="cloud model override (registry name, hub id or local path)")
    parser.add_argument("--no-compare", action="store_true", help="skip the one-shot generations per mode")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    started = time.perf_counter()
    from diffusionx.models.registry import EMBEDDED_SHAPES_DIR

    embedded = (EMBEDDED_SHAPES_DIR / "model_index.json").exists()
    overrides: dict[str, str] = {}
    if args.config is None and not embedded:
        overrides.update(TINY_MODELS)
        print(f"embedded shapes weights not found in {EMBEDDED_SHAPES_DIR}: using tiny-random models")
    overrides.update(
        {k: v for k, v in (("edge_model", args.edge_model), ("cloud_model", args.cloud_model)) if v}
    )
    summary: dict[str, Any] = {"url": args.url}
    if args.url is None:  # SIGTERM stops like Ctrl-C, so the started application is shut down
        from deployments.local import stop_on_signals

        with stop_on_signals():
            return _run(args, out_dir, started, embedded, overrides, summary)
    return _run(args, out_dir, started, embedded, overrides, summary)


def _run(
    args: argparse.Namespace,
    out_dir: Path,
    started: float,
    embedded: bool,
    overrides: dict[str, str],
    summary: dict[str, Any],
) -> int:
    stop = None
    try:
        # 1. the application
        if args.url is None:
            from deployments.local import start_local_app, stop_local_app

            print("starting Ray Serve (the first start takes a minute) ...", flush=True)
            stop = stop_local_app
            summary["url"] = start_local_app(args.config, port=args.port, overrides=overrides or None)
        with DiffusionXClient(summary["url"]) as client:
            models = describe_models(client.health().details, overrides, embedded)
            summary["models"] = models
            print(
                f"server {summary['url']}: edge {models['edge']}, cloud {models['cloud']}. {models['note']}"
            )
            # 2.-4. the session, its final image and the other modes
            compare = () if args.no_compare else COMPARE_MODES
            run_session(client, out_dir, summary, SCRIPT, args.seed, compare)
        return 0
    except KeyboardInterrupt:
        summary["error"] = "interrupted"
        print("\ninterrupted", file=sys.stderr)
        return 130
    except DiffusionXError as error:
        summary["error"] = f"{type(error).__name__}: {error}"
        print(f"demo failed: {summary['error']}", file=sys.stderr)
        return 1
    finally:
        # 5. the files (also of a failed run, as far as it got)
        if summary.get("rounds"):
            summary["total_s"] = round(time.perf_counter() - started, 2)
            json_path, md_path = write_summary(summary, out_dir)
            print(
                f"wrote {len(summary['rounds'])} previews and {'final.png, ' if summary.get('final') else ''}"
                f"{json_path.name}, {md_path.name} in {out_dir}/"
            )
        # 6. shut down
        if stop is not None:
            print("shutting down Ray Serve ...", flush=True)
            stop()


if __name__ == "__main__":
    sys.exit(main())
