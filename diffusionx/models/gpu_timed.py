"""Models that keep a GPU's time: each denoising step takes what a GPU profile says for its batch size.

Why. On one machine every replica shares the same cores, so an added replica adds contention, not
capacity, and no local experiment shows what an autoscaling policy buys on a GPU cluster. A GPU-timed model
runs the real serving stack (batching, step batcher, service model, router, admission, metrics) around a
UNet that *waits* `t(b)` seconds per step instead of computing, with `t(b)` from a GPU profile, and whose
model load waits the profile's load time. Waiting releases the core, so replicas add capacity on one
machine as GPUs would, within what its cores can schedule.

The profile is `diffusionx gpu-bench`'s JSON (`models.{edge,cloud}.rows[].step.seconds_per_step` per
`batch_size`, optional `models.*.load_s`): a real run's `gpu_bench.json`, or the shipped
`gpu_profiles/a100-sd15-tiny-sd.json` (published A100 figures, source stated in the file, not measured
here). `DIFFUSIONX_GPU_PROFILE` names the file to use. Between measured batch sizes `t(b)` is linear; past
the last it extends the last segment.

Images come from a cheap stand-in, `ZeroNoise`: a noise estimate of zero, so the scheduler's trajectory
runs (a preview decodes its scaled starting noise, a finalize its scaled, noised input image) at the cost of
a tensor fill. Why not a real small UNet: a UNet's call costs the host tens of milliseconds of Python and
kernel dispatch whatever its size, about a GPU step itself, so on a few shared cores the stand-ins of all
replicas made the CPU, not the modelled GPUs, the bottleneck; a GPU step costs its host next to nothing.
Where this differs from a GPU: the host work of a request (HTTP, Ray Serve, PNG coding, VAE at 32x32,
Python) is a CPU's and shares the machine's cores, so a busy machine still slows requests down, and a step
that starts late takes longer than `t(b)` (`GpuTimedUNet.overruns` counts steps whose stand-in alone took
longer than `t(b)`); images are not SD's (quality is not what these models are for); memory limits (OOM at
large batches) are not modelled.
"""

from __future__ import annotations

import json
import os
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

PROFILE_ENV = "DIFFUSIONX_GPU_PROFILE"
DEFAULT_PROFILE = Path(__file__).resolve().parent / "gpu_profiles" / "a100-sd15-tiny-sd.json"
ROLES = ("edge", "cloud")


@dataclass(frozen=True)
class StepTimes:
    """`t(b)` of one model: seconds per guided denoising step at measured batch sizes, and load time."""

    batch_sizes: tuple[int, ...]
    seconds_per_step: tuple[float, ...]
    load_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.batch_sizes or len(self.batch_sizes) != len(self.seconds_per_step):
            raise ValueError("a GPU profile needs at least one (batch_size, seconds_per_step) row")
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise ValueError(f"batch sizes {self.batch_sizes} must be distinct, increasing and >= 1")
        if min(self.seconds_per_step) <= 0 or self.load_s < 0:
            raise ValueError("seconds_per_step must be > 0 and load_s >= 0")

    def step_s(self, batch_size: int) -> float:
        """t(b): linear between measured batch sizes, the first row below them, the last segment past them."""
        sizes, times = self.batch_sizes, self.seconds_per_step
        if len(sizes) == 1 or batch_size <= sizes[0]:
            return times[0] * (1.0 if batch_size <= sizes[0] else batch_size / sizes[0])
        i = min(max(1, bisect_left(sizes, batch_size)), len(sizes) - 1)
        b0, b1, t0, t1 = sizes[i - 1], sizes[i], times[i - 1], times[i]
        return t0 + (t1 - t0) * (batch_size - b0) / (b1 - b0)


@dataclass(frozen=True)
class GpuProfile:
    device: str
    models: dict[str, StepTimes]  # by role: "edge", "cloud"
    path: str = ""

    def role(self, role: str) -> StepTimes:
        if role not in self.models:
            raise ValueError(f"GPU profile {self.path} has no '{role}' model (it has {sorted(self.models)})")
        return self.models[role]


def parse_profile(report: dict[str, Any], path: str = "") -> GpuProfile:
    """A gpu-bench report (`diffusionx gpu-bench`'s gpu_bench.json) as step times per role; OOM rows skip."""
    if report.get("benchmark") != "gpu" or not isinstance(report.get("models"), dict):
        raise ValueError(f"{path or 'profile'}: not a gpu-bench report (needs benchmark 'gpu' and 'models')")
    models = {}
    for role, entry in report["models"].items():
        rows = [
            (int(row["batch_size"]), float(row["step"]["seconds_per_step"]))
            for row in entry.get("rows", [])
            if not row.get("step", {}).get("oom") and "seconds_per_step" in row.get("step", {})
        ]
        rows.sort()
        models[role] = StepTimes(
            tuple(b for b, _ in rows), tuple(t for _, t in rows), float(entry.get("load_s") or 0.0)
        )
    return GpuProfile(device=str(report.get("setup", {}).get("device", "")), models=models, path=path)


def load_profile(path: str | Path | None = None) -> GpuProfile:
    """The profile at `path`, else at $DIFFUSIONX_GPU_PROFILE, else the shipped A100 profile."""
    path = Path(path or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE).expanduser()
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"GPU profile {path}: cannot read it ({error}); set {PROFILE_ENV} to a gpu-bench "
                         "gpu_bench.json") from None  # fmt: skip
    return parse_profile(report, str(path))


class ZeroNoise(torch.nn.Module):
    """The stand-in noise estimate of a GPU-timed model (module docstring): zeros shaped like the sample, with
    the configuration, dtype and device of the UNet it stands in for."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = cast(torch.dtype, self.unet.dtype)
        return dtype

    @property
    def device(self) -> torch.device:
        device: torch.device = cast(torch.device, self.unet.device)
        return device

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=torch.zeros_like(sample))


class GpuTimedUNet(torch.nn.Module):
    """A UNet whose call lasts `t(b)`: the stand-in computes the output, then a wait pads it.

    `rows_per_sample` is 2 under classifier-free guidance (`predict_noise` stacks [uncond; cond]), as in
    the profile, whose step at batch size b is one guided UNet call of 2b rows."""

    def __init__(self, standin: torch.nn.Module, times: StepTimes, rows_per_sample: int = 2) -> None:
        super().__init__()
        self.standin: Any = standin  # a diffusers UNet: its config, dtype and device are read through
        self.times = times
        self.rows_per_sample = rows_per_sample
        self.overruns = 0  # steps whose stand-in compute alone took longer than t(b)
        self.sleep = time.sleep

    @property
    def config(self) -> Any:
        return self.standin.config

    @property
    def dtype(self) -> torch.dtype:
        return self.standin.dtype

    @property
    def device(self) -> torch.device:
        return self.standin.device

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        batch_size = max(1, -(-sample.shape[0] // self.rows_per_sample))
        output = self.standin(sample, *args, **kwargs)
        left_s = self.times.step_s(batch_size) - (time.perf_counter() - start)
        if left_s > 0:
            self.sleep(left_s)
        else:
            self.overruns += 1
        return output
