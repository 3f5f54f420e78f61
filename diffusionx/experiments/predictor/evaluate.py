"""`diffusionx predictor eval`: the learned predictors against fixed strengths and the heuristic, on held-out
sessions.

Held-out sessions come from a session seed and image seeds that `predictor label` never uses. Each session
runs as served, through the workflows on in-process tiers:
1. round 0: an edge preview; every later round: from the previous image, an edit by every edit method
   (`learned`: the served edit predictor, `heuristic`, `fixed-s`), each judged with `targets.edit_ok`;
   the session carries the learned edit on (the image the server would have shown);
2. finalize the final preview with every refine method: `learned` and `heuristic` through the predictor
   tier (the strength is predicted inside `workflows.modes.refine`), `fixed-s` with the strength given;
   a full cloud generation of the same prompt and seed is the reference.
Quality is the mean judge accuracy (and exact-match rate) on the final prompt, cost the mean cloud UNet
calls per session. The target is the reference's mean accuracy minus `TARGET_MARGIN`. The edit methods'
quality is their ok-rate, their cost edge UNet calls. Also measured: CPU milliseconds of one prediction
and of one edge preview (single requests, process CPU time, one torch thread).

    diffusionx predictor eval --sessions 64 --json --plot runs/predictor/pareto.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from diffusionx.experiments.evaluation import load_pair
from diffusionx.experiments.predictor.label import add_session_options, check_session_args
from diffusionx.experiments.predictor.targets import FIXED_STRENGTHS, TARGET_MARGIN, edit_ok
from diffusionx.experiments.predictor.train import EDIT_TARGET_MARGIN
from diffusionx.models.loading import LoadedModel
from diffusionx.policy.learned import load_predictor
from diffusionx.policy.strength import heuristic_edit_strength, predict_strength
from diffusionx.requests import Img2ImgRequest, PreviewRequest
from diffusionx.shapes.data import SessionStep, make_session_steps
from diffusionx.shapes.judge import score
from diffusionx.workflows import modes
from diffusionx.workflows.local import local_tiers
from diffusionx.workflows.modes import Tiers

EVAL_SESSION_SEED = 1  # labels use session seed 0: disjoint session streams
EVAL_IMAGE_SEED = 50_000  # labels use 10_000 + index (< 50_000 for any label run below 40k sessions)
DEFAULT_SESSIONS = 64


async def eval_session(
    learned: Tiers, heuristic: Tiers, steps: Sequence[SessionStep], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(edit rows, refine rows) of one session, one row per method (and round for edits)."""
    image = (await modes.preview(learned, PreviewRequest(steps[0].prompt, seed))).image
    previous_prompt = steps[0].prompt
    edit_rows = []
    # 1. edits: every method from the same previous image; the learned edit carries on
    for step in steps[1:]:
        previous_scores = score(image, previous_prompt)
        jobs = {
            "learned": modes.edit_predicted(learned, step.prompt, image, previous_prompt, seed=seed),
            "heuristic": modes.edit_predicted(heuristic, step.prompt, image, previous_prompt, seed=seed),
        }
        for s in FIXED_STRENGTHS:
            jobs[f"fixed-{s}"] = modes.edit(learned, Img2ImgRequest(step.prompt, image, s, seed=seed))
        results = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
        for method, result in results.items():
            scores = score(result.image, step.prompt)
            edit_rows.append(
                {
                    "method": method,
                    "ok": float(edit_ok(scores, previous_scores, step.change or "")),
                    "accuracy": scores["accuracy"],
                    "edge_unet_calls": result.unet_calls.edge,
                    "strength": result.strength,
                }
            )
        image, previous_prompt = results["learned"].image, step.prompt
    # 2. finalize the final preview with every refine method; the full cloud generation as reference
    prompt = steps[-1].prompt
    refine_jobs: dict[str, Awaitable[modes.Generated | modes.Refined]] = {
        "cloud (full generation)": modes.generate(learned, "cloud", PreviewRequest(prompt, seed)),
        "learned": modes.refine(learned, prompt, image, seed=seed),
        "heuristic": modes.refine(heuristic, prompt, image, seed=seed),
    }
    for s in FIXED_STRENGTHS:
        refine_jobs[f"fixed-{s}"] = modes.refine(learned, prompt, image, seed=seed, strength=s)
    refine_rows = []
    preview_wrong = float(score(image, prompt)["exact"] == 0.0)  # what a predictor should recognise
    for method, done in zip(refine_jobs, await asyncio.gather(*refine_jobs.values()), strict=True):
        result = done.result
        scores = score(result.image, prompt)
        refine_rows.append(
            {
                "method": method,
                "quality": scores["accuracy"],
                "exact_match": float(scores["accuracy"] == 1.0),
                "cloud_unet_calls": result.unet_calls.cloud,
                "strength": 1.0 if result.strength is None else result.strength,  # text-to-image: 1
                "preview_wrong": preview_wrong,
                "preview": image,  # the final preview and its prompt, for the alignment model's own AUC
                "prompt": prompt,
            }
        )
    return edit_rows, refine_rows


def _means(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    return {
        method: {key: float(statistics.fmean(r[key] for r in group)) for key in keys}
        for method, group in by_method.items()
    }


def roc_auc(scores: Sequence[float], positives: Sequence[float]) -> float:
    """ROC AUC of `scores` for the binary `positives`: the probability that a random positive scores above
    a random negative, ties counting one half (Mann-Whitney U); NaN without both classes."""
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    if not pos or not neg:
        return float("nan")
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return float(wins / (len(pos) * len(neg)))


def wrong_preview_auc(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per refine method: the AUC of its chosen strength as a score for "the final preview is wrong"."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    return {
        method: roc_auc([r["strength"] for r in group], [r["preview_wrong"] for r in group])
        for method, group in by_method.items()
        if method in ("learned", "heuristic")
    }


def alignment_margin_auc(alignment: Any, rows: Sequence[dict[str, Any]]) -> float | None:
    """The ROC AUC of the alignment model's own smallest margin (negated) as a score for "the final preview
    is wrong", over the same previews as `wrong_preview_auc` (what the refine predictor reads, before it
    turns it into a strength); None without an alignment model."""
    if alignment is None:
        return None
    from diffusionx.policy.features import alignment_features

    learned = [r for r in rows if r["method"] == "learned"]
    if not learned:
        return None
    margins = alignment_features(alignment, [r["prompt"] for r in learned], [r["preview"] for r in learned])
    return roc_auc([-float(m) for m in margins[:, -1]], [r["preview_wrong"] for r in learned])


def _cold(predictor: Callable[..., float], *args: Any) -> float:
    """One prediction with a cold text cache: the prompt and its perturbations are encoded anew."""
    _clear_alignment_cache(predictor)
    return predictor(*args)


def _clear_alignment_cache(predictor: Any) -> None:
    alignment = getattr(predictor, "alignment", None)
    if alignment is not None:
        alignment.clear_cache()


def cpu_ms(function: Callable[[], Any], repeats: int = 10) -> float:
    """Median process CPU milliseconds of one call (after one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        function()
        times.append((time.process_time() - start) * 1000.0)
    return float(statistics.median(times))


def evaluate(
    cloud: LoadedModel,
    edge: LoadedModel,
    refine_predictor: Callable[..., float],
    edit_predictor: Callable[..., float],
    n_sessions: int,
    rounds: int,
    *,
    session_seed: int = EVAL_SESSION_SEED,
    image_seed: int = EVAL_IMAGE_SEED,
    concurrency: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the held-out sessions (see the module docstring) and returns the report (the `--json` object)."""
    learned = local_tiers(
        cloud, edge, max_batch_size=64, predict=refine_predictor, predict_edit=edit_predictor
    )
    heuristic = local_tiers(
        cloud, edge, max_batch_size=64, predict=predict_strength, predict_edit=heuristic_edit_strength
    )
    sessions = make_session_steps(n_sessions, rounds, seed=session_seed)
    start = time.perf_counter()
    edit_rows, refine_rows = _run_sessions(learned, heuristic, sessions, image_seed, concurrency, progress)
    seconds = time.perf_counter() - start
    aucs = wrong_preview_auc(refine_rows)
    margin_auc = alignment_margin_auc(getattr(refine_predictor, "alignment", None), refine_rows)
    wrong_previews = int(sum(r["preview_wrong"] for r in refine_rows if r["method"] == "learned"))
    refine_by_method = _means(refine_rows, ("quality", "cloud_unet_calls", "exact_match", "strength"))
    reference = refine_by_method.pop("cloud (full generation)")
    edit_by_method = _means(edit_rows, ("ok", "edge_unet_calls", "accuracy", "strength"))
    edit_target = (
        max(v["ok"] for k, v in edit_by_method.items() if k.startswith("fixed-")) - EDIT_TARGET_MARGIN
    )
    probe = sessions[0][0].prompt
    timing = _cpu_timing(learned, refine_predictor, edit_predictor, probe, image_seed)
    return {
        "target": reference["quality"] - TARGET_MARGIN,
        "methods": {
            m: {"quality": v["quality"], "cloud_unet_calls": v["cloud_unet_calls"]}
            for m, v in refine_by_method.items()
        },
        "edit": {
            "target": edit_target,
            "methods": {
                m: {"quality": v["ok"], "edge_unet_calls": v["edge_unet_calls"], "accuracy": v["accuracy"]}
                for m, v in edit_by_method.items()
            },
        },
        "reference": {"method": "cloud (full generation)", **reference},
        "wrong_preview_auc": aucs["learned"],
        "wrong_preview_auc_by_method": aucs,
        "alignment_margin_auc": margin_auc,
        "wrong_previews": wrong_previews,
        "exact_match": {m: v["exact_match"] for m, v in refine_by_method.items()},
        "mean_strength": {m: v["strength"] for m, v in refine_by_method.items()},
        "edit_mean_strength": {m: v["strength"] for m, v in edit_by_method.items()},
        "sessions": n_sessions,
        "rounds": rounds,
        "session_seed": session_seed,
        "image_seed": image_seed,
        "seconds": round(seconds, 1),
        "timing": timing,
        "predictors": {
            "refine": getattr(refine_predictor, "name", "heuristic"),
            "edit": getattr(edit_predictor, "name", "heuristic"),
        },
    }


def _run_sessions(
    learned: Tiers,
    heuristic: Tiers,
    sessions: list[list[SessionStep]],
    image_seed: int,
    concurrency: int,
    progress: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(edit rows, refine rows) of every session, `concurrency` sessions at a time."""
    edit_rows: list[dict[str, Any]] = []
    refine_rows: list[dict[str, Any]] = []
    n_sessions = len(sessions)
    with tqdm(total=n_sessions, desc="eval", unit="session", file=sys.stderr, disable=not progress) as bar:
        for begin in range(0, n_sessions, concurrency):
            chunk = range(begin, min(n_sessions, begin + concurrency))

            async def run(chunk: range = chunk) -> list[tuple[list, list]]:
                return list(
                    await asyncio.gather(
                        *(eval_session(learned, heuristic, sessions[i], image_seed + i) for i in chunk)
                    )
                )

            for edits, refines in asyncio.run(run()):
                edit_rows += edits
                refine_rows += refines
            bar.update(len(chunk))
    return edit_rows, refine_rows


def _cpu_timing(
    learned: Tiers,
    refine_predictor: Callable[..., float],
    edit_predictor: Callable[..., float],
    probe: str,
    image_seed: int,
) -> dict[str, float]:
    """CPU cost of one prediction against one edge preview (single requests, one torch thread as the
    predictor replica runs: with more threads, process CPU time counts their spin-waits)."""
    image = asyncio.run(modes.preview(learned, PreviewRequest(probe, image_seed))).image
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            # a cold text cache: each request's prompt and its perturbations are encoded anew
            "refine_predict_cpu_ms": cpu_ms(lambda: _cold(refine_predictor, probe, image)),
            "edit_predict_cpu_ms": cpu_ms(lambda: _cold(edit_predictor, probe, image, probe)),
            "edge_preview_cpu_ms": cpu_ms(
                lambda: asyncio.run(modes.preview(learned, PreviewRequest(probe, image_seed))), repeats=5
            ),
        }
    finally:
        torch.set_num_threads(threads)


def cheapest_reaching(
    methods: dict[str, dict[str, float]], target: float, prefix: str = "fixed-"
) -> str | None:
    reaching = [m for m, v in methods.items() if m.startswith(prefix) and v["quality"] >= target - 1e-9]
    return min(reaching, key=lambda m: methods[m]["cloud_unet_calls"]) if reaching else None


def to_table(report: dict[str, Any]) -> str:
    target = report["target"]
    lines = [
        f"refine, {report['sessions']} held-out sessions (target: judge accuracy >= {target:.4f}, the full "
        f"cloud generation's {report['reference']['quality']:.4f} - {TARGET_MARGIN})",
        f"{'method':<26}{'quality':>9}{'exact':>8}{'cloud calls':>13}{'strength':>10}  reaches target",
    ]
    rows = {**report["methods"], "cloud (full generation)": report["reference"]}
    for method, v in rows.items():
        exact = report["exact_match"].get(method, report["reference"]["exact_match"])
        strength = (
            report["mean_strength"].get(method, 1.0) if method in report["mean_strength"] else float("nan")
        )
        lines.append(
            f"{method:<26}{v['quality']:>9.4f}{exact:>8.3f}{v['cloud_unet_calls']:>13.2f}{strength:>10.3f}  "
            f"{'yes' if v['quality'] >= target - 1e-9 else 'no'}"
        )
    edit = report["edit"]
    lines += [
        "",
        f"edit (ok: new prompt satisfied, unchanged attributes kept; target ok-rate >= {edit['target']:.4f})",
        f"{'method':<26}{'ok-rate':>9}{'accuracy':>10}{'edge calls':>12}{'strength':>10}",
    ]
    for method, v in edit["methods"].items():
        lines.append(
            f"{method:<26}{v['quality']:>9.4f}{v['accuracy']:>10.4f}{v['edge_unet_calls']:>12.2f}"
            f"{report['edit_mean_strength'][method]:>10.3f}"
        )
    timing = report["timing"]
    aucs = report["wrong_preview_auc_by_method"]
    lines += [
        "",
        f"wrong final previews: {report['wrong_previews']} of {report['sessions']}; AUC of the strength "
        "for 'the preview is wrong': " + ", ".join(f"{m} {v:.3f}" for m, v in aucs.items()),
    ]
    lines += [
        "",
        f"CPU ms per single request: refine prediction {timing['refine_predict_cpu_ms']:.1f}, "
        f"edit prediction {timing['edit_predict_cpu_ms']:.1f}, "
        f"edge preview {timing['edge_preview_cpu_ms']:.1f}",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Quality against cost per method (refine: cloud calls; edit: edge calls), with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, methods, cost, target, title in (
        (
            left,
            {**report["methods"], "cloud (full)": report["reference"]},
            "cloud_unet_calls",
            report["target"],
            "refine at finalize",
        ),
        (
            right,
            report["edit"]["methods"],
            "edge_unet_calls",
            report["edit"]["target"],
            "round-to-round edit",
        ),
    ):
        for method, v in methods.items():
            colour = (
                "tab:red" if method == "learned" else "tab:green" if method == "heuristic" else "tab:blue"
            )
            axis.scatter(v[cost], v["quality"], color=colour, s=40, zorder=3)
            axis.annotate(
                method, (v[cost], v["quality"]), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
        axis.set_xlabel(f"mean {cost.replace('_', ' ')} per session")
        axis.set_ylabel("judge accuracy" if cost == "cloud_unet_calls" else "edit ok-rate")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    figure.suptitle(
        f"learned strength predictors vs fixed strengths and the heuristic "
        f"({report['sessions']} held-out sessions)",
        fontsize=10,
    )
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionx predictor eval",
        description="Learned strength predictors vs fixed strengths and the heuristic on held-out sessions.",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=DEFAULT_SESSIONS,
        help=f"held-out sessions (default {DEFAULT_SESSIONS})",
    )
    parser.add_argument("--rounds", type=int, default=2, help="prompts per session (default 2)")
    parser.add_argument(
        "--refine-predictor", default="shapes-refine", help="shipped name or .safetensors path"
    )
    parser.add_argument("--edit-predictor", default="shapes-edit", help="shipped name or .safetensors path")
    parser.add_argument(
        "--session-seed",
        type=int,
        default=EVAL_SESSION_SEED,
        help=f"seed of the session prompts (default {EVAL_SESSION_SEED}, held out; 0: the labels' prompts, "
        "which `loadgen` and `bench compare` also send)",
    )
    parser.add_argument(
        "--image-seed",
        type=int,
        default=EVAL_IMAGE_SEED,
        help=f"session i's image seed is this + i (default {EVAL_IMAGE_SEED}; `bench compare --seed S`: S)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--plot", default="runs/predictor/pareto.png", help="Pareto plot (PNG) path")
    add_session_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_session_args(parser, args)
    try:
        refine_predictor = load_predictor(args.refine_predictor)
        edit_predictor = load_predictor(args.edit_predictor, embedder=refine_predictor.embedder)
    except FileNotFoundError as error:
        parser.error(str(error))
    cloud, edge = load_pair("diffusionx", args.cloud, args.edge, args.device)
    assert cloud is not None and edge is not None  # diffusionx mode loads both
    report = evaluate(
        cloud,
        edge,
        refine_predictor,
        edit_predictor,
        args.sessions,
        args.rounds,
        session_seed=args.session_seed,
        image_seed=args.image_seed,
        concurrency=args.concurrency,
        progress=not args.no_progress,
    )
    if args.plot:
        report["plot"] = str(plot(report, args.plot))
    print(json.dumps(report) if args.json else to_table(report))
    return 0
