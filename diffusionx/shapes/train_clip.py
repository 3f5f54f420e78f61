"""`diffusionx train-clip`: the shapes world's image-text alignment model (`shapes-clip`, a CLIPModel).

Algorithm:
1. Model outputs (cached in the run directory, resumable by chunk): shapes sessions of two rounds from a
   session seed neither `predictor label` nor `predictor eval` uses, run through the served workflows on
   in-process tiers: an edge preview of the first prompt, an edge edit toward the second at a strength of
   the edit grid, a cloud refinement of that edit at a strength of the refine grid. Held-out edge previews
   of held-out prompts are made the same way, for the metrics.
2. What each output shows: the judge reads the image (`judge.describe`) and its caption becomes the
   positive; an output the judge cannot read as one or two shapes is left out. The prompt the output was
   made for is a negative when the judge disagrees with it (so a wrong preview scores its prompt low).
3. Training, one CPU thread: each batch is fresh clean renders of training scenes and model outputs
   (`--output-share` of it, half by default; `--wrong-share` of those drawn from the outputs the judge finds
   wrong for their prompt, the rest from all). Image -> text: cross-entropy over the batch's positives plus
   `--negatives` one-attribute perturbations of each image's positive (`shapes.perturb`: colour, kind, size,
   position with the swap within a pair, background), sampled attribute first so every attribute is trained;
   text -> image: cross-entropy over the batch's images. Duplicate captions in a batch are masked, not
   counted as negatives. Beside it, linear read-outs of the vision tower (`AttributeHeads`, not exported)
   predict each colour's shape attributes and the background from the pooled token, so the tower learns
   where shapes are early (see the class). The text tower starts from the shipped text encoder and keeps its
   tokenizer.
4. Every `--export-every` steps: attribute accuracy on held-out clean renders and held-out edge previews
   (`attribute_accuracy`), one metrics row (JSON lines in the run directory), a resumable checkpoint, and
   the model exported in `save_pretrained` layout with its tokenizer, image processor and a model card.

    diffusionx train-clip --minutes 40            # -> diffusionx/models/shapes_clip/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from diffusionx.models.alignment import SHAPES_CLIP_DIR, image_processor, shapes_clip_configs
from diffusionx.models.registry import EMBEDDED_SHAPES_DIR
from diffusionx.shapes import data, judge
from diffusionx.shapes.perturb import ATTRIBUTES, perturbations

CLIP_SESSION_SEED = 7  # predictor label uses session seed 0, predictor eval 1
CLIP_IMAGE_SEED = 200_000
HELDOUT_IMAGE_SEED = 300_000
EDIT_STRENGTHS = (0.25, 0.5, 0.75, 1.0)
REFINE_STRENGTHS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
IMAGE_SIZE = 32
PATCH_SIZES = (2, 4, 8)  # divisors of IMAGE_SIZE
OUTPUTS_SAVE_SECONDS = 60.0


@dataclass
class Outputs:
    """Model outputs with the prompt each was made for: (N, 32, 32, 3) uint8 and N prompts."""

    pixels: np.ndarray
    prompts: list[str]
    kinds: list[str]  # "preview" | "edit" | "refine"

    def images(self) -> list[Image.Image]:
        return [Image.fromarray(p) for p in self.pixels]


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), np.uint8)


async def _session_outputs(tiers: Any, index: int, steps: Sequence[data.SessionStep]) -> list[tuple]:
    from diffusionx.requests import Img2ImgRequest, PreviewRequest
    from diffusionx.workflows import modes

    seed = CLIP_IMAGE_SEED + index
    preview = (await modes.preview(tiers, PreviewRequest(steps[0].prompt, seed))).image
    edit_strength = EDIT_STRENGTHS[index % len(EDIT_STRENGTHS)]
    edited = (
        await modes.edit(tiers, Img2ImgRequest(steps[1].prompt, preview, edit_strength, seed=seed))
    ).image
    refine_strength = REFINE_STRENGTHS[(index // len(EDIT_STRENGTHS)) % len(REFINE_STRENGTHS)]
    refined = await modes.refine(tiers, steps[1].prompt, edited, seed=seed, strength=refine_strength)
    return [
        (_array(preview), steps[0].prompt, "preview"),
        (_array(edited), steps[1].prompt, "edit"),
        (_array(refined.result.image), steps[1].prompt, "refine"),
    ]


def _save_outputs(path: Path, rows: list[tuple]) -> None:
    np.savez_compressed(
        path,
        pixels=np.stack([r[0] for r in rows]) if rows else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
        prompts=np.array([r[1] for r in rows]),
        kinds=np.array([r[2] for r in rows]),
    )


def _load_rows(path: Path) -> list[tuple]:
    if not path.exists():
        return []
    stored = np.load(path)
    return list(zip(stored["pixels"], stored["prompts"].tolist(), stored["kinds"].tolist(), strict=True))


def make_outputs(
    tiers: Any, path: Path, n_sessions: int, concurrency: int = 64, progress: bool = True
) -> Outputs:
    """Model outputs of `n_sessions` sessions (3 per session), appended chunk by chunk to `path`."""
    rows = _load_rows(path)
    sessions = data.make_session_steps(n_sessions, rounds=2, seed=CLIP_SESSION_SEED)
    done = len(rows) // 3
    saved = time.monotonic()
    with tqdm(
        total=n_sessions,
        initial=done,
        desc="model outputs",
        unit="session",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for begin in range(done, n_sessions, concurrency):
            chunk = range(begin, min(n_sessions, begin + concurrency))

            async def run(chunk: range = chunk) -> list[list[tuple]]:
                return list(await asyncio.gather(*(_session_outputs(tiers, i, sessions[i]) for i in chunk)))

            for session_rows in asyncio.run(run()):
                rows.extend(session_rows)
            # every chunk rewrites the whole file: at tens of thousands of sessions that would cost more
            # than the chunks themselves, so save once a minute (a resumed run redoes at most that)
            if time.monotonic() - saved >= OUTPUTS_SAVE_SECONDS or chunk.stop == n_sessions:
                _save_outputs(path, rows)
                saved = time.monotonic()
            bar.update(len(chunk))
    return Outputs(np.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows])


def make_heldout_previews(tiers: Any, path: Path, n: int) -> Outputs:
    """Edge previews of `n` held-out prompts (cached in `path`)."""
    from diffusionx.requests import PreviewRequest
    from diffusionx.workflows import modes

    rows = _load_rows(path)
    if len(rows) < n:
        prompts = data.heldout_prompts(n, seed=0)

        async def run() -> list[Image.Image]:
            return [
                r.image
                for r in await asyncio.gather(
                    *(
                        modes.preview(tiers, PreviewRequest(p, HELDOUT_IMAGE_SEED + i))
                        for i, p in enumerate(prompts)
                    )
                )
            ]

        rows = [
            (_array(image), prompt, "preview")
            for image, prompt in zip(asyncio.run(run()), prompts, strict=True)
        ]
        _save_outputs(path, rows)
    return Outputs(np.stack([r[0] for r in rows[:n]]), [r[1] for r in rows[:n]], [r[2] for r in rows[:n]])


def seen_caption(image: Image.Image, prompt: str) -> str | None:
    """The caption of what the judge sees in `image` (shapes in the prompt's order where the colours match),
    or None when it does not see one or two shapes."""
    seen = judge.describe(image)
    if seen["background"] is None or not 1 <= len(seen["shapes"]) <= 2:
        return None
    try:
        order = [s.colour for s in data.parse_caption(prompt).shapes]
    except ValueError:
        order = []
    colours = sorted(seen["shapes"], key=lambda c: order.index(c) if c in order else len(order))
    shapes = tuple(
        data.Shape(
            kind=seen["shapes"][c]["kind"],
            colour=c,
            size=seen["shapes"][c]["size"],
            position=seen["shapes"][c]["position"],
        )
        for c in colours
    )
    return data.caption(data.Scene(shapes=shapes, background=seen["background"]))


def to_pixel_values(pixels: np.ndarray) -> torch.Tensor:
    """(B, 32, 32, 3) uint8 -> (B, 3, 32, 32): what the shipped image processor does to a 32x32 image
    (no resize or crop at that size; scale to [0, 1], normalise with mean 0.5 and std 0.5). Training uses
    this batched form; `test_alignment` checks it against the processor."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def _sample_negatives(positive: str, k: int, rng: random.Random, extra: str | None) -> list[str]:
    options = {a: texts for a, texts in perturbations(positive).items() if texts}
    negatives = [extra] if extra is not None and extra != positive else []
    attributes = list(options)
    while len(negatives) < k and attributes:
        attribute = rng.choice(attributes)
        negatives.append(rng.choice(options[attribute]))
    return negatives[:k]


def contrastive_loss(
    model: Any,
    pixel_values: torch.Tensor | None,
    positives: list[str],
    negatives: list[list[str]],
    tokenizer: Any,
    image_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image -> (batch positives + own hard negatives) and text -> image cross-entropy (module docstring).
    `image_features`: the projected image features, when the caller has them already."""
    texts = positives + [t for row in negatives for t in row]
    tokens = _tokens(tokenizer, texts)
    if image_features is None:
        image_features = _pooled(model.get_image_features(pixel_values=pixel_values))
    image = torch.nn.functional.normalize(image_features, dim=-1)
    text = torch.nn.functional.normalize(_pooled(model.get_text_features(**tokens)), dim=-1)
    scale = model.logit_scale.exp()
    b = len(positives)
    logits = scale * image @ text.T  # (B, B + sum K)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    start = b
    for i, row in enumerate(negatives):
        others = torch.ones(sum(len(r) for r in negatives), dtype=torch.bool)
        others[start - b : start - b + len(row)] = False
        mask[i, b:] = others  # another image's hard negatives are not this image's
        start += len(row)
    same = torch.tensor([[positives[i] == positives[j] and i != j for j in range(b)] for i in range(b)])
    mask[:, :b] = same
    for i in range(b):  # a hard negative that happens to equal this image's positive is not a negative
        for j in range(b, len(texts)):
            if not mask[i, j] and texts[j] == positives[i]:
                mask[i, j] = True
    image_to_text = torch.nn.functional.cross_entropy(logits.masked_fill(mask, -1e4), torch.arange(b))
    square = logits[:, :b].T.masked_fill(same, -1e4)
    text_to_image = torch.nn.functional.cross_entropy(square, torch.arange(b))
    return (image_to_text + text_to_image) / 2


class AttributeHeads(torch.nn.Module):
    """Linear read-outs of the vision tower's pooled token, used only while training: for each palette
    colour, whether a shape of that colour is there and its kind, size and position; and the background.

    Contrastive loss alone tells the vision tower where a shape is only late: the batch's captions differ
    mostly in colours, which the mean of the patches already shows, and a one-attribute hard negative is a
    weak signal until the pooled token attends to the shapes. These read-outs supervise what the captions
    describe directly, so position and kind are learnt in hundreds of steps instead of thousands; they
    are not part of the exported CLIPModel."""

    SLOTS = 1 + len(data.KINDS) + len(data.SIZES) + len(data.POSITIONS)

    def __init__(self, width: int) -> None:
        super().__init__()
        self.background = torch.nn.Linear(width, len(data.COLOURS))
        self.shapes = torch.nn.Linear(width, len(data.COLOURS) * self.SLOTS)

    def loss(self, pooled: torch.Tensor, scenes: Sequence[data.Scene]) -> torch.Tensor:
        b, c = len(scenes), len(data.COLOURS)
        background = torch.tensor([data.COLOURS.index(s.background) for s in scenes])
        total = torch.nn.functional.cross_entropy(self.background(pooled), background)
        slots = self.shapes(pooled).view(b, c, self.SLOTS)
        present = torch.zeros(b, c)
        kind, size, position = (torch.full((b, c), -100, dtype=torch.long) for _ in range(3))
        for i, scene in enumerate(scenes):
            for shape in scene.shapes:
                j = data.COLOURS.index(shape.colour)
                present[i, j] = 1.0
                kind[i, j] = data.KINDS.index(shape.kind)
                size[i, j] = data.SIZES.index(shape.size)
                position[i, j] = data.POSITIONS.index(shape.position)
        total = total + torch.nn.functional.binary_cross_entropy_with_logits(slots[..., 0], present)
        start = 1
        for target, count in (
            (kind, len(data.KINDS)),
            (size, len(data.SIZES)),
            (position, len(data.POSITIONS)),
        ):
            logits = slots[..., start : start + count].reshape(b * c, count)
            total = total + torch.nn.functional.cross_entropy(logits, target.reshape(-1), ignore_index=-100)
            start += count
        return total


def _tokens(tokenizer: Any, texts: Sequence[str]) -> Any:
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def _pooled(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def caption_margins(
    model: Any, tokenizer: Any, pixel_values: torch.Tensor, captions: Sequence[str]
) -> list[dict[str, float]]:
    """Per image: for each attribute, its caption's score minus the best score among that attribute's
    one-attribute perturbations (attributes whose caption has none are left out)."""
    model.eval()
    image = torch.nn.functional.normalize(
        _pooled(model.get_image_features(pixel_values=pixel_values)), dim=-1
    )
    margins: list[dict[str, float]] = []
    for i, text in enumerate(captions):
        options = perturbations(text)
        texts = [text] + [t for a in ATTRIBUTES for t in options[a]]
        tokens = _tokens(tokenizer, texts)
        scores = (
            torch.nn.functional.normalize(_pooled(model.get_text_features(**tokens)), dim=-1) @ image[i]
        ).tolist()
        row: dict[str, float] = {}
        start = 1
        for attribute in ATTRIBUTES:
            part = scores[start : start + len(options[attribute])]
            start += len(options[attribute])
            if part:
                row[attribute] = scores[0] - max(part)
        margins.append(row)
    model.train()
    return margins


def attribute_accuracy(
    model: Any, tokenizer: Any, pixel_values: torch.Tensor, captions: Sequence[str]
) -> dict[str, float]:
    """Per attribute: the share of images whose caption scores above every one-attribute perturbation of
    that attribute (images whose caption has none are not counted); "all": above every perturbation."""
    wins: dict[str, list[float]] = {a: [] for a in (*ATTRIBUTES, "all")}
    for row in caption_margins(model, tokenizer, pixel_values, captions):
        for attribute, margin in row.items():
            wins[attribute].append(float(margin > 0))
        wins["all"].append(float(all(m > 0 for m in row.values())))
    return {a: round(float(np.mean(v)), 4) if v else float("nan") for a, v in wins.items()}


def wrong_auc(
    model: Any, tokenizer: Any, pixel_values: torch.Tensor, prompts: Sequence[str], wrong: Sequence[bool]
) -> float:
    """ROC AUC of the negated smallest margin (prompt against every one-attribute perturbation) as a score
    for "the judge finds the image wrong for its prompt": how well the alignment model alone tells a wrong
    preview from a right one, which is what the strength predictors read from it."""
    from diffusionx.experiments.predictor.evaluate import roc_auc

    margins = caption_margins(model, tokenizer, pixel_values, prompts)
    return round(roc_auc([-min(m.values(), default=0.0) for m in margins], list(wrong)), 4)


def pick_output(rng: random.Random, n: int, wrong: Sequence[int], wrong_share: float | None) -> int:
    """The index of a model output for a batch: with probability `wrong_share` one of the outputs wrong for
    their prompt (`wrong`), otherwise (and always when `wrong_share` is None) any of the `n`."""
    if wrong_share is not None and wrong and rng.random() < wrong_share:
        return wrong[rng.randrange(len(wrong))]
    return rng.randrange(n)


def learning_rate(base: float, step: int, progress: float, warmup_steps: int = 100) -> float:
    """Linear warm-up over the first steps, then cosine decay over the time budget (`progress` in [0, 1])."""
    warmup = min(1.0, (step + 1) / warmup_steps)
    return base * warmup * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))


def new_model(seed: int, patch_size: int = 4) -> tuple[Any, Any]:
    """A CLIPModel (its vision tower in `patch_size` patches) whose text tower starts from the shipped text
    encoder, and the shipped tokenizer."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_SHAPES_DIR, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(EMBEDDED_SHAPES_DIR, subfolder="text_encoder")
    torch.manual_seed(seed)
    model = CLIPModel(shapes_clip_configs(encoder.config.to_dict(), IMAGE_SIZE, patch_size))
    # CLIPTextModel's keys carry a "text_model." prefix in some transformers versions, none in others
    weights = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    model.text_model.load_state_dict(weights)
    init_position_embedding(model)
    return model, tokenizer


def init_model(directory: str) -> tuple[Any, Any]:
    """An exported CLIPModel and its tokenizer, to train further (`--init`); a directory that does not hold
    one is a clear error."""
    from transformers import CLIPModel, CLIPTokenizer

    path = Path(directory)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"--init {directory}: no CLIPModel there (expected a save_pretrained directory with config.json, "
            f"like {SHAPES_CLIP_DIR})"
        )
    model = CLIPModel.from_pretrained(path)
    if model.config.vision_config.image_size != IMAGE_SIZE:
        raise ValueError(
            f"--init {directory}: its vision tower reads {model.config.vision_config.image_size}px images; "
            f"train-clip trains on {IMAGE_SIZE}px"
        )
    return model, CLIPTokenizer.from_pretrained(path)


def init_position_embedding(model: Any, scale: float = 0.15) -> None:
    """Starts the vision tower's learned position embeddings from a 2D sine-cosine table (MAE's) at about
    the scale of the patch embeddings. CLIP's default (normal, std 0.02) makes the patches' positions a
    small fraction of their content, so "on the left" and "on the right" look alike to the pooled token
    for many steps; a shapes image is defined by where its shapes are."""
    embedding = model.vision_model.embeddings.position_embedding.weight  # (1 + G*G, D): class token first
    dim = embedding.shape[1]
    grid = round((embedding.shape[0] - 1) ** 0.5)
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for coordinate in (ys.reshape(-1), xs.reshape(-1)):
        angles = coordinate[:, None] * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)  # (G*G, 4 * quarter)
    with torch.no_grad():
        embedding.zero_()
        embedding[1:, : table.shape[1]] = scale * table


MODEL_CARD = """---
library_name: transformers
tags: [clip, shapes, diffusionx]
---
# shapes-clip

The image-text alignment model of DiffusionX's embedded shapes world: a `transformers.CLIPModel` (a ViT of
{vision_layers} layers over 32x32 images in {patch}x{patch} patches, width {width}; the text tower starts from
the shipped `shapes` text encoder and keeps its tokenizer), {parameters:,} parameters. The strength
predictors read it (`diffusionx/policy/features.py`): the similarity of a preview to its prompt and the
margin against each one-attribute perturbation of the prompt.

Trained with

{commands}

on clean renders of procedural training scenes and on what the embedded models produce (edge previews,
edge edits, cloud refinements of {sessions} sessions of session seed {session_seed}), each captioned by
what the judge sees in it, with one-attribute perturbations as hard negatives
(`diffusionx/shapes/train_clip.py`).

Attribute accuracy (for each held-out image, its caption scores above every perturbation of that attribute;
"all": above every perturbation), step {step}, {minutes:.1f} minutes on one CPU thread (the run of the last
command above):

| images | {header} |
|---|{rule}|
| clean held-out renders ({n_clean}) | {clean} |
| held-out edge previews the judge finds right ({n_previews}) | {previews} |

Wrong-preview AUC: over all {n_all_previews} held-out edge previews, the negated smallest margin of the
prompt against its perturbations, as a score for "the judge finds the preview wrong": {wrong_auc:.3f}.
"""


def write_card(directory: Path, row: dict[str, Any], settings: dict[str, Any], model: Any) -> None:
    columns = [*ATTRIBUTES, "all"]
    directory.joinpath("README.md").write_text(
        MODEL_CARD.format(
            vision_layers=model.config.vision_config.num_hidden_layers,
            patch=model.config.vision_config.patch_size,
            width=model.config.vision_config.hidden_size,
            parameters=sum(p.numel() for p in model.parameters()),
            commands="\n".join(
                f"    {c}" + (f"  # resumed at step {s}" if s > 0 else "") for s, c in settings["commands"]
            ),
            sessions=settings["sessions"],
            session_seed=CLIP_SESSION_SEED,
            step=row["step"],
            minutes=row["minutes"],
            header=" | ".join(columns),
            rule="|".join(["---"] * len(columns)),
            n_clean=row["n_clean"],
            n_previews=row["n_previews"],
            clean=" | ".join(f"{row['clean'][c]:.3f}" for c in columns),
            previews=" | ".join(f"{row['previews'][c]:.3f}" for c in columns),
            n_all_previews=row["n_all_previews"],
            wrong_auc=row["previews_wrong_auc"],
        )
    )


def card_commands(directory: Path) -> list[str]:
    """The training commands a model card written by `write_card` lists (none without a card)."""
    card = directory / "README.md"
    if not card.exists():
        return []
    lines = card.read_text().split("Trained with", 1)[-1].split("on clean renders", 1)[0].splitlines()
    return [line.strip() for line in lines if line.strip().startswith("diffusionx train-clip")]


def export(model: Any, tokenizer: Any, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor(IMAGE_SIZE).save_pretrained(directory)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionx train-clip",
        description="Train shapes-clip, the alignment model the strength predictors read (resumable: rerun "
        "the same command to continue from the run directory's checkpoint).",
    )
    parser.add_argument(
        "--out", default=str(SHAPES_CLIP_DIR), help="export directory (default: the package's)"
    )
    parser.add_argument("--run-dir", default="runs/clip", help="checkpoint, cached model outputs, metrics")
    parser.add_argument("--minutes", type=float, default=40.0, help="training time budget (default 40)")
    parser.add_argument("--steps", type=int, default=100_000, help="stop after this many steps")
    parser.add_argument(
        "--sessions", type=int, default=1536, help="sessions of model outputs (3 images each)"
    )
    parser.add_argument("--batch-size", type=int, default=96, help="images per step (default 96)")
    parser.add_argument(
        "--output-share",
        type=float,
        default=0.5,
        help="share of each batch drawn from model outputs, the rest clean renders (default 0.5)",
    )
    parser.add_argument(
        "--wrong-share",
        type=float,
        default=None,
        help="share of the model outputs drawn from those the judge finds wrong for their prompt, whose "
        "prompt is then a hard negative; the rest from all outputs (default: none, all drawn alike)",
    )
    parser.add_argument("--negatives", type=int, default=6, help="hard negatives per image (default 6)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    parser.add_argument("--export-every", type=int, default=250, help="steps between exports (default 250)")
    parser.add_argument("--heldout", type=int, default=400, help="held-out images per metric (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed")
    parser.add_argument(
        "--patch-size",
        type=int,
        choices=PATCH_SIZES,
        default=4,
        help="pixels per side of the vision tower's patches for a new model (default 4; 2 sees shapes' "
        "outlines at 4 times the tokens); --init and a resumed run keep their model's",
    )
    parser.add_argument(
        "--init",
        default=None,
        help="start from this CLIPModel (a save_pretrained directory, e.g. the shipped shapes-clip) instead "
        "of a new one; ignored when the run directory has a checkpoint",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "sessions", "batch_size", "export_every", "heldout"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: use an integer >= 1"
            )
    for name in ("output_share", "wrong_share"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            parser.error(f"--{name.replace('_', '-')}={value} is not allowed: use a share in [0, 1]")
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    command = "diffusionx train-clip " + " ".join(argv if argv is not None else sys.argv[2:])
    settings = {"commands": [(0, command)], "sessions": args.sessions, "seed": args.seed}
    if args.init is not None:  # the card lists how the starting model was trained, then this run
        settings["commands"] = [*((-1, c) for c in card_commands(Path(args.init))), (0, command)]

    # 1. model outputs and held-out previews (cached)
    from diffusionx.experiments.evaluation import load_pair
    from diffusionx.workflows.local import local_tiers

    cloud, edge = load_pair("diffusionx", "shapes-cloud", "shapes-edge", "cpu")
    tiers = local_tiers(cloud, edge, max_batch_size=64)
    outputs = make_outputs(tiers, run_dir / "outputs.npz", args.sessions, progress=not args.no_progress)
    heldout_previews = make_heldout_previews(tiers, run_dir / "heldout_previews.npz", args.heldout)

    # 2. what each output shows
    pool_pixels, pool_positive, pool_extra = [], [], []
    for pixels, prompt in zip(outputs.pixels, outputs.prompts, strict=True):
        seen = seen_caption(Image.fromarray(pixels), prompt)
        if seen is not None:
            pool_pixels.append(pixels)
            pool_positive.append(seen)
            pool_extra.append(prompt if prompt != seen else None)
    right = [
        judge.score(Image.fromarray(p), t)["exact"] == 1.0
        for p, t in zip(heldout_previews.pixels, heldout_previews.prompts, strict=True)
    ]
    all_preview_pixels = to_pixel_values(heldout_previews.pixels)
    preview_pixels = all_preview_pixels[torch.from_numpy(np.array(right, bool))]
    preview_captions = [t for t, ok in zip(heldout_previews.prompts, right, strict=True) if ok]
    clean_scenes = data.heldout_scenes(args.heldout, seed=0)
    clean_pixels = to_pixel_values(np.stack([_array(data.render(s)) for s in clean_scenes]))
    clean_captions = [data.caption(s) for s in clean_scenes]
    wrong_outputs = [i for i, extra in enumerate(pool_extra) if extra is not None]
    print(
        f"model outputs: {len(outputs.prompts)}, readable: {len(pool_positive)}, "
        f"wrong for their prompt: {sum(e is not None for e in pool_extra)}",
        file=sys.stderr,
    )

    # 3. training (resumes from the checkpoint)
    checkpoint_path = run_dir / "checkpoint.pt"
    state = torch.load(checkpoint_path, weights_only=False) if checkpoint_path.exists() else None
    if state is not None:  # a resumed run keeps its model's patches
        patch_size = int(state["model"]["vision_model.embeddings.patch_embedding.weight"].shape[-1])
        model, tokenizer = new_model(args.seed, patch_size)
    elif args.init is not None:
        model, tokenizer = init_model(args.init)
    else:
        model, tokenizer = new_model(args.seed, args.patch_size)
    heads = AttributeHeads(model.config.vision_config.hidden_size)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=args.lr, weight_decay=0.01)
    step, elapsed = 0, 0.0
    rng = random.Random(args.seed)
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        rng.setstate(state["rng"])
        # a resumed run may change its budget or data; the card lists every command from its first step
        history = [tuple(c) for c in state.get("commands", [(0, "(not recorded)")])]
        settings["commands"] = history if history[-1][1] == command else [*history, (step, command)]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", file=sys.stderr)
    scene_rng = data.scene_rng(args.seed * 1_000_003 + step, data.TRAIN_STREAM)
    model.train()
    metrics_path = run_dir / "metrics.jsonl"
    start = time.perf_counter() - elapsed
    bar = tqdm(
        total=args.steps,
        initial=step,
        desc="train-clip",
        unit="step",
        file=sys.stderr,
        disable=args.no_progress,
    )
    losses: list[float] = []
    while step < args.steps and time.perf_counter() - start < args.minutes * 60:
        n_clean = int(args.batch_size * (1.0 - args.output_share))  # the default: batch_size // 2, as before
        scenes = [data.random_scene(scene_rng) for _ in range(n_clean)]
        picks = [
            pick_output(rng, len(pool_positive), wrong_outputs, args.wrong_share)
            for _ in range(args.batch_size - n_clean)
        ]
        pixels = np.stack([_array(data.render(s)) for s in scenes] + [pool_pixels[i] for i in picks])
        positives = [data.caption(s) for s in scenes] + [pool_positive[i] for i in picks]
        extras = [None] * n_clean + [pool_extra[i] for i in picks]
        negatives = [
            _sample_negatives(p, args.negatives, rng, e) for p, e in zip(positives, extras, strict=True)
        ]
        pooled = model.vision_model(pixel_values=to_pixel_values(pixels)).pooler_output
        image_features = model.visual_projection(pooled)
        loss = contrastive_loss(
            model, None, positives, negatives, tokenizer, image_features=image_features
        ) + heads.loss(pooled, [data.parse_caption(p) for p in positives])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, step, (time.perf_counter() - start) / (args.minutes * 60))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *heads.parameters()], 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if (
            step % args.export_every == 0
            or step >= args.steps
            or time.perf_counter() - start >= args.minutes * 60
        ):
            elapsed = time.perf_counter() - start
            row = {
                "step": step,
                "minutes": round(elapsed / 60, 2),
                "loss": round(float(np.mean(losses[-args.export_every :])), 4),
                "n_clean": len(clean_captions),
                "n_previews": len(preview_captions),
                "clean": attribute_accuracy(model, tokenizer, clean_pixels, clean_captions),
                "previews": attribute_accuracy(model, tokenizer, preview_pixels, preview_captions),
                "n_all_previews": len(right),
                "previews_wrong_auc": wrong_auc(
                    model, tokenizer, all_preview_pixels, heldout_previews.prompts, [not r for r in right]
                ),
            }
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            torch.save(
                {
                    "model": model.state_dict(),
                    "heads": heads.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "elapsed": elapsed,
                    "rng": rng.getstate(),
                    "commands": settings["commands"],
                },
                checkpoint_path,
            )
            export(model, tokenizer, out)
            write_card(out, row, settings, model)
            print(json.dumps(row), file=sys.stderr)
    bar.close()
    print(
        json.dumps({"out": str(out), "steps": step, "minutes": round((time.perf_counter() - start) / 60, 1)})
    )
    return 0
