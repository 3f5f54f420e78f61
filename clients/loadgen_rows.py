"""Reading the load generator's rows (`clients.loadgen.COLUMNS`): what the benchmarks' summaries share."""

from __future__ import annotations

from typing import Any


def ok(row: dict[str, Any]) -> bool:
    """Whether the request was answered 2xx."""
    return str(row["status"]) == "200"


def number(value: Any) -> float | None:
    """A numeric column's value; None where the row has none."""
    return None if value in ("", None) else float(value)


def sessions(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows grouped by `session`, in order; a row without one (a finalize-only run) is its own."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for index, row in enumerate(rows):
        key = str(row.get("session", "")) or f"request-{index}"
        grouped.setdefault(key, []).append(row)
    return grouped


def session_latencies_s(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each complete session's summed request latency in seconds, by session: the sessions whose requests
    all succeeded and that ended with a finalize."""
    return {
        key: sum(float(row["e2e_ms"]) for row in group) / 1000.0
        for key, group in sessions(rows).items()
        if all(ok(row) for row in group) and group[-1]["kind"] == "finalize"
    }


def ok_finalizes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finalizes answered 2xx, in row order."""
    return [row for row in rows if row["kind"] == "finalize" and ok(row)]


def finalize_latencies_s(rows: list[dict[str, Any]]) -> list[float]:
    """The latencies in seconds of the 2xx finalizes, in row order."""
    return [float(row["e2e_ms"]) / 1000.0 for row in ok_finalizes(rows)]


def finalizes_within(rows: list[dict[str, Any]], target_ms: float) -> tuple[int, int]:
    """(finalizes answered 2xx within `target_ms`, finalizes sent): SLO attainment's two counts."""
    finalizes = [row for row in rows if row["kind"] == "finalize"]
    within = sum(1 for row in finalizes if ok(row) and float(row["e2e_ms"]) <= target_ms)
    return within, len(finalizes)
