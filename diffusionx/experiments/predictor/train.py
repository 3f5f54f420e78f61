"""`diffusionx predictor train`: fit the refine and edit predictors on a label file and ship them.

Algorithm, for each predictor (`refine`: final preview + final prompt; `edit`: previous image + new prompt
+ previous prompt):
1. features (`policy.features`, the `full` set unless `--refine-features`/`--edit-features` say
   otherwise) of every labelled example; targets 1[target <= s_k] over the grid, where
   the target is the label, and for the refine predictor at least `WRONG_PREVIEW_MIN_STRENGTH` on a
   preview the judge finds wrong (`targets.py` says why);
2. split by session: every fifth session is validation, the rest training;
3. train the MLP of `policy.learned` (full-batch AdamW, binary cross-entropy, seeded), keeping the epoch with
   the lowest validation loss (early stopping);
4. set the predictor's decision (`policy.learned`): the refine predictor's `risk` decision (unless
   `--refine-decision quantile`) with the floor `--risk-floor` under it and the scale `--risk-scale`; the
   edit predictor's `quantile` threshold, and the risk scale with `--risk-scale auto`, are picked on the
   validation sessions from what was measured there: the setting with the fewest UNet calls whose
   estimated quality meets the target (refine: mean judge accuracy within `TARGET_MARGIN` of the full
   cloud generations'; edit: ok-rate within `EDIT_TARGET_MARGIN` of the best fixed grid strength's). A
   refine strength at or above a session's label is counted at the label's measured accuracy (labelling
   stops at the first strength that reaches the bar), one below it at its own, so the refine estimate is
   optimistic; the validation metrics of the setting used are saved with it either way;
5. save `<prefix>-refine.safetensors` and `<prefix>-edit.safetensors` (settings and provenance in the
   metadata) where `load_predictor` finds them by name.

    diffusionx predictor train --data runs/predictor/labels.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffusionx import imaging
from diffusionx.experiments.predictor.label import DEFAULT_OUT, read_records
from diffusionx.experiments.predictor.targets import (
    EDIT_GRID,
    REFINE_GRID,
    TARGET_MARGIN,
    WRONG_PREVIEW_MIN_STRENGTH,
)
from diffusionx.policy.features import FEATURE_SETS, TextEmbedder, build_features, feature_dim
from diffusionx.policy.learned import (
    DECISIONS,
    WEIGHTS_DIR,
    LearnedStrengthPredictor,
    PredictorConfig,
    StrengthNet,
)

if TYPE_CHECKING:
    from diffusionx.models.alignment import AlignmentModel

EDIT_TARGET_MARGIN = 0.02  # edit ok-rate the learned edit predictor may give up against the best fixed
WEIGHT_DECAY = 0.1
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))  # quantile decision's settings
RISK_SCALES = tuple(round(t, 2) for t in np.arange(0.05, 1.01, 0.05))  # risk decision's settings
VALIDATION_EVERY = 5  # session index % 5 == 0: validation
DEFAULT_EPOCHS = 3000  # the shipped predictors' settings (docs/models.md)
DEFAULT_HIDDEN = 16
# the risk decision's floor (policy.learned): at the predicted label's median (0.5) held-out quality sat
# at its target; 0.7 leaves a margin (docs/results.md#strength-predictors)
DEFAULT_RISK_FLOOR = 0.7
# the risk decision's scale: validation takes the least scale it allows, as its quality estimate is
# optimistic (a strength above a session's label counts at the label's accuracy); held out, 0.3 under the
# floor kept the quality of the least scale at fewer calls (docs/results.md#strength-predictors)
DEFAULT_RISK_SCALE = 0.3


@dataclass
class Examples:
    """One predictor's examples: inputs, label index per example, and what was measured per grid strength
    (quality, or NaN where not measured, and UNet calls)."""

    sessions: list[int]
    prompts: list[str]
    images: list[Any]
    previous_prompts: list[str | None]
    labels: np.ndarray  # (E,) grid index of the label
    quality: np.ndarray  # (E, K) measured quality per grid strength (NaN: not run)
    calls: np.ndarray  # (E, K) UNet calls per grid strength
    reference: np.ndarray  # (E,) refine: the full cloud generation's accuracy; edit: unused (NaN)
    # (E,) grid index the net learns: the label, or for the refine predictor at least
    # `WRONG_PREVIEW_MIN_STRENGTH` on a preview the judge finds wrong (targets.py says why)
    targets: np.ndarray
    wrong: np.ndarray  # (E,) refine: the judge finds the preview wrong; edit: all False


def refine_examples(
    records: Sequence[dict[str, Any]], wrong_min_strength: float = WRONG_PREVIEW_MIN_STRENGTH
) -> Examples:
    """`wrong_min_strength`: the least strength the predictor learns for a wrong preview (0: the label)."""
    rows = [r["refine"] for r in records]
    quality = np.full((len(rows), len(REFINE_GRID)), np.nan)
    calls = np.zeros((len(rows), len(REFINE_GRID)))
    for i, row in enumerate(rows):
        full_calls = row["cloud"]["cloud_calls"]
        calls[i] = [int(full_calls * s) for s in REFINE_GRID]
        for trial in row["trials"]:
            quality[i, REFINE_GRID.index(trial["strength"])] = trial["accuracy"]
    labels = np.array([REFINE_GRID.index(row["label"]) for row in rows])
    wrong = np.array([row["preview_scores"]["exact"] < 1.0 for row in rows], dtype=bool)
    floor = int(np.searchsorted(REFINE_GRID, wrong_min_strength - 1e-9)) if wrong_min_strength > 0 else 0
    return Examples(
        sessions=[r["session"] for r in records],
        prompts=[row["prompt"] for row in rows],
        images=[imaging.decode_png_base64(row["image"]) for row in rows],
        previous_prompts=[None] * len(rows),  # a finalize carries no history
        labels=labels,
        quality=quality,
        calls=calls,
        reference=np.array([row["cloud"]["accuracy"] for row in rows]),
        targets=np.where(wrong, np.maximum(labels, floor), labels),
        wrong=wrong,
    )


def edit_examples(records: Sequence[dict[str, Any]]) -> Examples:
    rows = [(r["session"], e) for r in records for e in r["edits"]]
    labels = np.array([EDIT_GRID.index(e["label"]) for _, e in rows])
    return Examples(
        sessions=[session for session, _ in rows],
        prompts=[e["prompt"] for _, e in rows],
        images=[imaging.decode_png_base64(e["image"]) for _, e in rows],
        previous_prompts=[e["previous_prompt"] for _, e in rows],
        labels=labels,
        quality=np.array([[float(t["ok"]) for t in e["trials"]] for _, e in rows]),
        calls=np.array([[t["edge_calls"] for t in e["trials"]] for _, e in rows], dtype=float),
        reference=np.full(len(rows), np.nan),
        targets=labels,
        wrong=np.zeros(len(rows), dtype=bool),
    )


def estimated_quality(kind: str, examples: Examples, picks: np.ndarray) -> np.ndarray:
    """(E,) quality of picking grid index `picks` per example, from what was measured (see step 4)."""
    rows = np.arange(len(picks))
    if kind == "refine":
        at_label = examples.quality[rows, examples.labels]
        measured = examples.quality[rows, picks]
        return np.where(picks >= examples.labels, at_label, measured)
    return examples.quality[rows, picks]


def cumulative_targets(labels: np.ndarray, k: int) -> torch.Tensor:
    """(E, K) 1[label <= s_k]."""
    return (torch.from_numpy(labels)[:, None] <= torch.arange(k)[None, :]).float()


def fit(
    features: np.ndarray,
    labels: np.ndarray,
    config: PredictorConfig,
    epochs: int,
    seed: int,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[StrengthNet, dict[str, float]]:
    """Full-batch AdamW on binary cross-entropy; with `validation` (features, labels), the weights of the
    epoch with the lowest validation loss are kept (early stopping: a few hundred examples overfit fast)."""
    torch.manual_seed(seed)
    net = StrengthNet(config)
    x = torch.from_numpy(features)
    net.feature_mean.copy_(x.mean(0))
    net.feature_std.copy_(x.std(0).clamp(min=1e-3))
    y = cumulative_targets(labels, len(config.grid))
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    best = {"epoch": -1, "validation_loss": float("inf"), "train_loss": float("nan")}
    best_state = None
    for epoch in range(epochs):
        net.train()
        optimiser.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimiser.step()
        if validation is None:
            continue
        net.eval()
        with torch.no_grad():
            val_x = torch.from_numpy(validation[0])
            val_loss = float(loss_fn(net(val_x), cumulative_targets(validation[1], len(config.grid))))
        if val_loss < best["validation_loss"]:
            best = {"epoch": epoch, "validation_loss": val_loss, "train_loss": float(loss.detach())}
            best_state = {key: value.clone() for key, value in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    # the constant predictor's loss, to show what the features add
    prior = y.mean(0).clamp(1e-4, 1 - 1e-4)
    if validation is not None:
        val_y = cumulative_targets(validation[1], len(config.grid))
        best["prior_validation_loss"] = float(
            torch.nn.functional.binary_cross_entropy(prior.expand_as(val_y), val_y)
        )
    return net.eval(), best


def choose_setting(
    kind: str,
    predictor: LearnedStrengthPredictor,
    features: np.ndarray,
    examples: Examples,
    fixed: float | None = None,
) -> tuple[float, dict[str, float]]:
    """The validation setting of the predictor's decision (`threshold` for quantile, `risk_scale` for risk)
    with the fewest calls whose estimated quality meets the target; `fixed` measures that one setting only.

    For the refine predictor the target must be met by one standard error of the validation sessions'
    mean quality: the cheapest setting that meets it exactly on a few hundred sessions is as likely to
    miss it as to meet it on others (the held-out sessions of `predictor eval`)."""
    grid = predictor.config.grid
    if kind == "refine":
        target = float(examples.reference.mean() - TARGET_MARGIN)
    else:
        target = float(examples.quality.mean(0).max() - EDIT_TARGET_MARGIN)
    probs = predictor.probabilities(features)
    rows = np.arange(len(examples.labels))
    settings = THRESHOLDS
    if fixed is not None:
        settings = (fixed,)
    elif predictor.config.decision == "risk":
        least = predictor.min_risk_scale
        settings = (round(least, 4), *(s for s in RISK_SCALES if s > least + 1e-9))
    candidates, per_session = [], []
    for setting in settings:
        picks = np.array([grid.index(s) for s in predictor.choose(probs, setting)])
        session_quality = estimated_quality(kind, examples, picks)
        per_session.append(session_quality)
        candidates.append((setting, float(session_quality.mean()), float(examples.calls[rows, picks].mean())))
    slack = 0.0
    if kind == "refine" and len(rows) > 1:
        slack = float(np.mean([q.std(ddof=1) for q in per_session]) / np.sqrt(len(rows)))
    meeting = [c for c in candidates if c[1] >= target + slack - 1e-9]
    setting, quality, calls = (
        min(meeting, key=lambda c: (c[2], -c[1])) if meeting else max(candidates, key=lambda c: c[1])
    )
    extra: dict[str, float] = {}
    if kind == "refine" and examples.wrong.any() and not examples.wrong.all():
        from diffusionx.experiments.predictor.evaluate import roc_auc

        chosen = predictor.choose(probs, setting)
        extra["wrong_preview_auc"] = round(roc_auc(chosen, examples.wrong.tolist()), 4)
    return setting, {
        **extra,
        "target": target,
        "slack": slack,
        "quality": quality,
        "calls": calls,
        "met": bool(meeting),
    }


def train_predictor(
    kind: str,
    examples: Examples,
    embedder: TextEmbedder,
    *,
    alignment: AlignmentModel | None = None,
    epochs: int = DEFAULT_EPOCHS,
    hidden: int = DEFAULT_HIDDEN,
    seed: int = 0,
    feature_set: str = "full",
    decision: str = "quantile",
    wrong_from: float | None = None,
    floor: float | None = None,
    risk_scale: float | None = None,
    provenance: dict[str, Any] | None = None,
) -> LearnedStrengthPredictor:
    """`decision`, `wrong_from`, `floor` and `risk_scale`: see `policy.learned` (risk: the refine predictor
    only, `wrong_from` the least strength its targets give a wrong preview; `risk_scale` None: chosen on
    validation, at least `min_risk_scale`)."""
    grid = list(REFINE_GRID if kind == "refine" else EDIT_GRID)
    features = build_features(
        embedder, examples.prompts, examples.images, examples.previous_prompts, alignment, feature_set
    )
    validation = np.array([s % VALIDATION_EVERY == 0 for s in examples.sessions])
    if validation.all() or not validation.any():
        validation = np.arange(len(validation)) % VALIDATION_EVERY == 0  # tiny data sets: split by example
    config = PredictorConfig(
        kind,
        grid,
        embedder.source,
        feature_dim(embedder.dim, alignment is not None, feature_set),
        alignment_model=None if alignment is None else alignment.name,
        features=feature_set,
        hidden=hidden,
        decision=decision,
        wrong_from=wrong_from,
        floor=floor,
    )
    net, fitted = fit(
        features[~validation],
        examples.targets[~validation],
        config,
        epochs,
        seed,
        validation=(features[validation], examples.targets[validation]),
    )
    predictor = LearnedStrengthPredictor(config, net, embedder, alignment)
    if risk_scale is not None and risk_scale < predictor.min_risk_scale - 1e-9:
        raise ValueError(
            f"risk_scale={risk_scale} is below {predictor.min_risk_scale:.4f}, the least that refines a "
            f"preview of risk 1/2 (with a floor above 1/2: of risk 1) at {wrong_from} or more"
        )
    subset = Examples(
        *(  # type: ignore[arg-type]  # the same fields, each list or array kept as it was
            [v for v, keep in zip(value, validation, strict=True) if keep]
            if isinstance(value, list)
            else value[validation]
            for value in (
                examples.sessions,
                examples.prompts,
                examples.images,
                examples.previous_prompts,
                examples.labels,
                examples.quality,
                examples.calls,
                examples.reference,
                examples.targets,
                examples.wrong,
            )
        )
    )
    fixed = risk_scale if decision == "risk" else None
    config.setting, metrics = choose_setting(kind, predictor, features[validation], subset, fixed)
    config.trained = {
        **(provenance or {}),
        "examples": len(examples.labels),
        "train_examples": int((~validation).sum()),
        "validation_examples": int(validation.sum()),
        "epochs": epochs,
        "validation": {**metrics, **fitted},
    }
    return predictor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionx predictor train", description="Train the refine and edit strength predictors."
    )
    parser.add_argument("--data", default=DEFAULT_OUT, help=f"label file (default {DEFAULT_OUT})")
    parser.add_argument(
        "--out-dir", default=str(WEIGHTS_DIR), help="where the .safetensors go (default: shipped)"
    )
    parser.add_argument("--prefix", default="shapes", help="names: <prefix>-refine, <prefix>-edit")
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"full-batch training epochs, at most (default {DEFAULT_EPOCHS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the initial weights")
    parser.add_argument(
        "--hidden",
        type=int,
        default=DEFAULT_HIDDEN,
        help=f"hidden units of each predictor's MLP (default {DEFAULT_HIDDEN})",
    )
    parser.add_argument(
        "--wrong-preview-min-strength",
        type=float,
        default=WRONG_PREVIEW_MIN_STRENGTH,
        help="the least refine strength learnt for a preview the judge finds wrong (0: the label alone; "
        f"default {WRONG_PREVIEW_MIN_STRENGTH})",
    )
    parser.add_argument(
        "--alignment-model",
        default="shapes-clip",
        help="the CLIP whose image-prompt features the predictors read (a registered name, hub id or local "
        "path; 'none' for the features without it; default shapes-clip)",
    )
    parser.add_argument(
        "--refine-decision",
        choices=DECISIONS,
        default="risk",
        help="how the refine predictor turns its probabilities into a strength (policy.learned): rising "
        "with the risk that the preview is wrong (default), or the smallest strength enough with the "
        "chosen probability (quantile, as the edit predictor)",
    )
    parser.add_argument(
        "--risk-floor",
        type=float,
        default=DEFAULT_RISK_FLOOR,
        help="under the risk decision, the refine strength is at least the smallest whose predicted "
        f"probability of being enough reaches this (0: no floor; default {DEFAULT_RISK_FLOOR})",
    )
    parser.add_argument(
        "--risk-scale",
        default=str(DEFAULT_RISK_SCALE),
        help="the risk decision's scale: how far the refine strength rises at certain risk (policy.learned), "
        f"or 'auto': the fewest validation calls that meet the quality target (default {DEFAULT_RISK_SCALE})",
    )
    for kind in ("refine", "edit"):
        parser.add_argument(
            f"--{kind}-features",
            choices=FEATURE_SETS,
            default="full",
            help=f"what the {kind} predictor reads (policy.features; default full)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    records = read_records(args.data)
    if len(records) < 2:
        print(
            f"diffusionx predictor train: error: {args.data} holds {len(records)} labelled sessions; "
            "run `diffusionx predictor label` first",
            file=sys.stderr,
        )
        return 1
    settings = records[0]["settings"]
    embedder = TextEmbedder.load(settings["cloud"])
    alignment = None
    if args.alignment_model != "none":
        from diffusionx.models.alignment import load_alignment_model

        alignment = load_alignment_model(args.alignment_model, device="cpu")
    report: dict[str, Any] = {"sessions": len(records)}
    if args.hidden < 1 or args.epochs < 1:
        print("diffusionx predictor train: error: --hidden and --epochs must be >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.wrong_preview_min_strength <= 1:
        print(
            f"diffusionx predictor train: error: --wrong-preview-min-strength="
            f"{args.wrong_preview_min_strength} is not allowed: use 0..1",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.risk_floor <= 1:
        print(
            f"diffusionx predictor train: error: --risk-floor={args.risk_floor} is not allowed: use 0..1 "
            "(0: no floor)",
            file=sys.stderr,
        )
        return 2
    try:
        risk_scale = None if args.risk_scale == "auto" else float(args.risk_scale)
    except ValueError:
        risk_scale = -1.0
    if risk_scale is not None and not 0 < risk_scale <= 1:
        print(
            f"diffusionx predictor train: error: --risk-scale={args.risk_scale} is not allowed: use a scale "
            "in (0, 1] or 'auto'",
            file=sys.stderr,
        )
        return 2
    feature_sets = {"refine": args.refine_features, "edit": args.edit_features}
    if alignment is None and "alignment" in feature_sets.values():
        print(
            "diffusionx predictor train: error: the 'alignment' features need an alignment model: "
            "drop --alignment-model none or use 'full'",
            file=sys.stderr,
        )
        return 2
    if args.refine_decision == "risk" and not REFINE_GRID[0] < args.wrong_preview_min_strength:
        print(
            "diffusionx predictor train: error: --refine-decision risk reads the probability of the least "
            f"strength learnt for a wrong preview; --wrong-preview-min-strength must be above "
            f"{REFINE_GRID[0]}, or use --refine-decision quantile",
            file=sys.stderr,
        )
        return 2
    refine = refine_examples(records, args.wrong_preview_min_strength)
    for kind, examples in (("refine", refine), ("edit", edit_examples(records))):
        risk = kind == "refine" and args.refine_decision == "risk"
        try:
            predictor = train_predictor(
                kind,
                examples,
                embedder,
                alignment=alignment,
                epochs=args.epochs,
                hidden=args.hidden,
                seed=args.seed,
                feature_set=feature_sets[kind],
                decision=args.refine_decision if kind == "refine" else "quantile",
                wrong_from=args.wrong_preview_min_strength if kind == "refine" else None,
                floor=(args.risk_floor or None) if risk else None,
                risk_scale=risk_scale if risk else None,
                provenance={
                    "data": str(args.data),
                    "sessions": len(records),
                    "wrong_preview_min_strength": args.wrong_preview_min_strength,
                    **settings,
                },
            )
        except ValueError as error:  # a --risk-scale the floor and grid rule out: say which
            print(f"diffusionx predictor train: error: {error}", file=sys.stderr)
            return 2
        path = predictor.save(Path(args.out_dir) / f"{args.prefix}-{kind}.safetensors")
        report[kind] = {
            "path": str(path),
            "decision": predictor.config.decision,
            "setting": predictor.config.setting,
            **({"floor": predictor.config.floor} if predictor.config.floor is not None else {}),
            **predictor.config.trained["validation"],
        }
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report))
    return 0
