"""The cloud tier's measured capacity (`clients.capacity`), from rows of a capacity run."""

from __future__ import annotations

import pytest

from clients.capacity import Capacity, measured_capacity


def finalize(done_s: float, status: int | str = 200, steps: int = 20) -> dict:
    return {"kind": "finalize", "status": status, "arrival_s": 0.01, "e2e_ms": (done_s - 0.01) * 1000.0,
            "cloud_unet_calls": steps if status == 200 else ""}  # fmt: skip


def test_the_rate_is_that_of_full_batches_not_of_filling_and_draining():
    # 4 waves of 8 that take 1 s each, after a 0.5 s start (the first wave's requests still arriving)
    rows = [finalize(0.5 + wave + 1.0) for wave in range(4) for _ in range(8)]
    assert measured_capacity(rows).per_s == pytest.approx(8.0)
    # a slow start (the first wave after 3 s) does not move it
    rows = [finalize(3.0 + wave) for wave in range(4) for _ in range(8)]
    assert measured_capacity(rows).per_s == pytest.approx(8.0)


def test_refused_finalizes_are_not_counted_and_too_few_is_an_error():
    rows = [finalize(1.0 + i / 4) for i in range(12)] + [finalize(0.02, status=503) for _ in range(20)]
    capacity = measured_capacity(rows)
    assert capacity.per_s == pytest.approx(4.0) and capacity.steps == 20.0
    with pytest.raises(RuntimeError, match="too few"):
        measured_capacity([finalize(1.0)] * 3)
    with pytest.raises(RuntimeError, match="too few"):
        measured_capacity([finalize(1.0)] * 16)  # all at one instant: no rate


def test_capacity_in_finalizes_of_other_step_counts_keeps_the_steps_per_second():
    capacity = Capacity(per_s=5.0, steps=20.0)
    assert capacity.at(20) == 5.0 and capacity.at(5) == 20.0 and capacity.at(0) == 100.0
