"""Learned strength predictors: a small MLP that reads a preview, its prompt and the prompt's history and
picks a strength from a grid.

Model: features (`policy.features`, the set its config names, standardised with the training set's mean and
std) -> Linear(F, H) -> ReLU -> Dropout -> Linear(H, K), one logit per grid strength s_k. Output k is the
probability that s_k is enough, P(label <= s_k), where the label is the smallest measured grid strength that
reached the quality target (`diffusionx predictor label`); it is trained with binary cross-entropy on the
cumulative targets 1[label <= s_k] (an ordinal regression, so "enough" is monotone in s). The prediction is
made by one of two decisions (`DECISIONS`, named in the config), on the probabilities made monotone by a
running maximum:

* `quantile`: the smallest s_k whose probability reaches `threshold` (the edit predictor; refine predictors
  trained before the `risk` decision);
* `risk` (the refine predictor): the strength rises with the probability that the preview is wrong, r =
  1 - P(label < `wrong_from`), where `wrong_from` is the least strength the predictor learnt for a wrong
  preview (`predictor train --wrong-preview-min-strength`): the smallest s_k >= s_1 + `risk_scale` * sqrt(r).
  The quantile decision chooses from a two-humped distribution (a right preview needs 0.05-0.1, a wrong
  one at least 0.3), so it jumps from the lightest strengths to 0.3 at one risk and gives every preview on
  either side the same strength; the rising strength spends more calls where the risk is higher, and the
  square root spreads the small risks most previews have over the grid's one-call steps (0.05-0.25), so
  the strength orders previews by risk as the probability does (docs/results.md#strength-predictors).
  A preview more likely wrong than right gets at least `wrong_from`: below it the cloud keeps a wrong
  preview's shapes, and a scale chosen for calls alone would never redraw them. The rising strength
  stops at the first grid strength past s_1 + `risk_scale`, less than a wrong preview far from its prompt
  needs; so when the config has a `floor`, the strength is at least the quantile decision's at threshold
  `floor` (`predictor train`'s default is 0.7): a preview the predictor expects to need more than the
  rising strength gives gets what it expects with probability `floor`, and the others keep the rising
  strength (docs/results.md#strength-predictors). A floor above 1/2 gives a preview of risk 1/2 or more
  `wrong_from` by itself (its P(label < `wrong_from`) is at most 1/2), so the scale is then free to grade
  the other previews more cheaply (`min_risk_scale`).

The quantile decision's `threshold` is chosen on validation sessions to meet the quality target with the
fewest UNet calls; the risk decision's `risk_scale` and `floor` are `predictor train`'s settings (its
`--risk-scale auto` chooses the scale the same way).

Two predictors share this code: `refine` (the strength of the cloud refinement at finalize, from the final
preview and its prompt) and `edit` (the strength of a round-to-round edit on the edge, from the previous
image, the new prompt and the previous prompt). They ship as safetensors with their settings in the
file's metadata, and load by name (`load_predictor("shapes-refine")`) or path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusionx.policy.features import TextEmbedder, build_features, check_feature_set

if TYPE_CHECKING:
    from diffusionx.models.alignment import AlignmentModel
from diffusionx.policy.strength import EditStrengthFunction, heuristic_edit_strength, predict_strength

WEIGHTS_DIR = Path(__file__).parent / "weights"
KINDS = ("refine", "edit")
DECISIONS = ("quantile", "risk")  # see the module docstring


@dataclass
class PredictorConfig:
    kind: str  # "refine" | "edit"
    grid: list[float]  # candidate strengths, ascending
    text_model: str  # registry model whose tokenizer and text encoder embed prompts
    input_dim: int
    alignment_model: str | None = None  # the CLIP whose features it reads (models.alignment), if any
    features: str = "full"  # which of `policy.features.FEATURE_SETS` it reads
    hidden: int = 8
    dropout: float = 0.5
    decision: str = "quantile"  # one of DECISIONS
    threshold: float = 0.5  # quantile: P(enough) a grid strength must reach to be picked
    wrong_from: float | None = None  # risk: the least strength learnt for a wrong preview
    risk_scale: float = 0.0  # risk: how far the strength rises above the grid's lightest at certain risk
    floor: float | None = None  # risk: the quantile decision at this threshold is the least strength
    trained: dict = field(default_factory=dict)  # provenance: label file, sessions, weights, metrics

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"predictor kind={self.kind!r} is not one of {list(KINDS)}")
        if (
            not self.grid
            or sorted(self.grid) != list(self.grid)
            or not 0 < self.grid[0] <= self.grid[-1] <= 1
        ):
            raise ValueError(f"grid={self.grid} must be ascending strengths in (0, 1]")
        check_feature_set(self.features, self.alignment_model is not None)
        if self.decision not in DECISIONS:
            raise ValueError(f"predictor decision={self.decision!r} is not one of {list(DECISIONS)}")
        if self.decision == "risk" and (
            self.wrong_from is None or not self.grid[0] < self.wrong_from <= self.grid[-1]
        ):
            raise ValueError(
                f"the risk decision needs wrong_from in ({self.grid[0]}, {self.grid[-1]}] "
                f"(the least strength learnt for a wrong preview), not {self.wrong_from}"
            )
        if self.floor is not None and (self.decision != "risk" or not 0 < self.floor <= 1):
            raise ValueError(
                f"floor={self.floor} is a threshold in (0, 1] under the risk decision (None: no floor); "
                f"this predictor's decision is {self.decision!r}"
            )

    @property
    def setting(self) -> float:
        """The decision's setting: `risk_scale` for the risk decision, `threshold` for the quantile one."""
        return self.risk_scale if self.decision == "risk" else self.threshold

    @setting.setter
    def setting(self, value: float) -> None:
        if self.decision == "risk":
            self.risk_scale = value
        else:
            self.threshold = value


class StrengthNet(torch.nn.Module):
    feature_mean: torch.Tensor  # buffers: saved with the weights
    feature_std: torch.Tensor

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(config.input_dim))
        self.register_buffer("feature_std", torch.ones(config.input_dim))
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(config.input_dim, config.hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(config.dropout),
            torch.nn.Linear(config.hidden, len(config.grid)),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) features -> (B, K) logits of P(label <= s_k)."""
        return self.mlp((features - self.feature_mean) / self.feature_std)


class LearnedStrengthPredictor:
    """Callable like the heuristic: `predictor(prompt, image) -> strength`; `predict` takes batches."""

    def __init__(
        self,
        config: PredictorConfig,
        net: StrengthNet,
        embedder: TextEmbedder,
        alignment: AlignmentModel | None = None,
    ) -> None:
        if (config.alignment_model is None) != (alignment is None):
            raise ValueError(
                f"predictor config names alignment model {config.alignment_model!r} but "
                f"{'none' if alignment is None else alignment.name!r} was given"
            )
        self.config = config
        self.net = net.eval()
        self.embedder = embedder
        self.alignment = alignment

    @property
    def name(self) -> str:
        reads = self.config.text_model + (
            f", {self.config.alignment_model}" if self.config.alignment_model else ""
        )
        return f"learned-{self.config.kind} ({reads})"

    @torch.no_grad()
    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(B, K) monotone P(label <= s_k)."""
        probs = torch.sigmoid(self.net(torch.from_numpy(features))).numpy()
        return np.maximum.accumulate(probs, axis=1)

    def risk(self, probs: np.ndarray) -> np.ndarray:
        """(B,) the risk decision's probability that each preview is wrong: 1 - P(label < `wrong_from`)
        (the config's check keeps a grid strength below `wrong_from`)."""
        below = int(np.searchsorted(self.config.grid, (self.config.wrong_from or 1.0) - 1e-9)) - 1
        return 1.0 - probs[:, below]

    @property
    def min_risk_scale(self) -> float:
        """The least `risk_scale` that refines a preview of risk 1/2 at `wrong_from` or more; with a `floor`
        above 1/2, which does that, the least that refines a preview of risk 1 there."""
        rise = (self.config.wrong_from or 0.0) - self.config.grid[0]
        if self.config.floor is not None and self.config.floor > 0.5:
            return rise
        return rise / float(np.sqrt(0.5))

    def choose(self, probs: np.ndarray, setting: float | None = None) -> list[float]:
        """The config's decision (see the module docstring) on (B, K) monotone probabilities; `setting`
        overrides its `threshold` (quantile) or `risk_scale` (risk)."""
        grid = self.config.grid
        setting = self.config.setting if setting is None else setting
        if self.config.decision == "risk":
            wanted = grid[0] + setting * np.sqrt(self.risk(probs))
            picks = np.minimum(np.searchsorted(grid, wanted - 1e-9), len(grid) - 1)
            if self.config.floor is not None:
                picks = np.maximum(picks, self._quantile_picks(probs, self.config.floor))
            return [float(grid[k]) for k in picks]
        return [float(grid[k]) for k in self._quantile_picks(probs, setting)]

    def _quantile_picks(self, probs: np.ndarray, threshold: float) -> np.ndarray:
        """(B,) grid index of the smallest strength whose probability reaches `threshold` (else the last)."""
        reached = probs >= threshold
        return np.where(reached.any(axis=1), reached.argmax(axis=1), probs.shape[1] - 1)

    def predict(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image],
        previous_prompts: Sequence[str | None] | None = None,
    ) -> list[float]:
        features = build_features(
            self.embedder, prompts, images, previous_prompts, self.alignment, self.config.features
        )
        return self.choose(self.probabilities(features))

    def prepare(self, images: Sequence[Image.Image]) -> None:
        """Computes beforehand what a prediction takes from these images alone (their alignment
        embeddings, which the alignment model keeps by pixels); nothing without an alignment model."""
        if self.alignment is not None:
            self.alignment.image_embeddings(images)

    def __call__(self, prompt: str, image: Image.Image, previous_prompt: str | None = None) -> float:
        return self.predict([prompt], [image], [previous_prompt])[0]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.contiguous() for key, value in self.net.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(asdict(self.config))})
        return path


def predictor_path(name_or_path: str) -> Path:
    """A shipped predictor's file (`shapes-refine` -> policy/weights/shapes-refine.safetensors) or a path."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors":
        return path
    return WEIGHTS_DIR / f"{name_or_path}.safetensors"


def shipped_predictors() -> list[str]:
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def strength_function(name: str, alignment_model: str | None = None) -> Callable[..., float]:
    """What a config names: "heuristic" (`policy.strength.predict_strength`) or a learned predictor (reading
    `alignment_model` instead of the CLIP its config names, when given)."""
    if name == "heuristic":
        return predict_strength
    return load_predictor(name, alignment_model=alignment_model)


def edit_strength_function(name: str, alignment_model: str | None = None) -> EditStrengthFunction:
    """What `edit_predictor` names: "heuristic" (`policy.strength.heuristic_edit_strength`) or a learned
    predictor (reading `alignment_model` instead of the CLIP its config names, when given)."""
    if name == "heuristic":
        return heuristic_edit_strength
    return load_predictor(name, alignment_model=alignment_model)


def load_predictor(
    name_or_path: str, embedder: TextEmbedder | None = None, alignment_model: str | None = None
) -> LearnedStrengthPredictor:
    """Loads a learned predictor by shipped name or .safetensors path; a missing one is a clear error.
    `alignment_model` loads the CLIP it was trained with from another place (a local copy of the same
    checkpoint); by default the one its config names."""
    path = predictor_path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"strength predictor '{name_or_path}' not found at {path}; shipped: {shipped_predictors()} "
            "(or give a .safetensors path written by `diffusionx predictor train`)"
        )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        config = PredictorConfig(**json.loads(handle.metadata()["config"]))
    net = StrengthNet(config)
    net.load_state_dict(load_file(str(path)))
    if embedder is None or embedder.source != config.text_model:
        embedder = TextEmbedder.load(config.text_model)
    alignment = None
    if config.alignment_model is not None:
        from diffusionx.models.alignment import load_alignment_model

        alignment = load_alignment_model(alignment_model or config.alignment_model, device="cpu")
    return LearnedStrengthPredictor(config, net, embedder, alignment)
