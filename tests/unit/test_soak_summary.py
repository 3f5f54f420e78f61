"""The soak harness's summary from samples and request rows (pure functions, no server)."""

from __future__ import annotations

import pytest

from clients.soak_bench import add_latencies, summarize


def rows_ending(times_and_latencies: list[tuple[float, float]], status: int | str = 200) -> list[dict]:
    return [
        {"arrival_s": end - latency, "e2e_ms": latency * 1000, "status": status}
        for end, latency in times_and_latencies
    ]


def test_summary_compares_the_first_and_last_windows_after_the_warm_up():
    # a 10-minute run: warm-up and windows are 2 minutes (a fifth of the run)
    samples = [
        {"t_s": 0.0, "rss_mib:CloudRefiner:1": 500.0, "rss_mib:EdgePreviewer:2": 400.0},
        {"t_s": 120.0, "rss_mib:CloudRefiner:1": 600.0, "rss_mib:EdgePreviewer:2": 400.0},
        {"t_s": 600.0, "rss_mib:CloudRefiner:1": 630.0, "rss_mib:EdgePreviewer:2": 380.0},
    ]
    rows = (
        rows_ending([(130.0 + i, 1.0) for i in range(19)] + [(200.0, 3.0)])  # first window after warm-up
        + rows_ending([(500.0 + i, 2.0) for i in range(20)])  # last window
        + rows_ending([(300.0, 1.0)], status=503)
    )
    summary = summarize(samples, rows, minutes=10, duration_s=600.0)
    assert summary["window_s"] == 120.0
    assert summary["rss_growth"] == {"CloudRefiner:1": 0.05, "EdgePreviewer:2": -0.05}
    assert summary["rss_growth_max"] == 0.05  # growth from the sample after the warm-up, not from start
    assert summary["errors"] == 1 and summary["requests"] == 41
    assert summary["p95_first_s"] == pytest.approx(1.0 + 0.05 * 2.0, abs=0.01)  # one slow of 20
    assert summary["p95_last_s"] == 2.0
    assert summary["cache_mib"] == {"after_warm_up": None, "last": None}  # these samples have no cache


def test_latency_percentiles_per_sample_window():
    samples = [{"t_s": 10.0}, {"t_s": 20.0}]
    add_latencies(samples, rows_ending([(5.0, 1.0), (15.0, 2.0), (16.0, 4.0)]), window_s=10.0)
    assert samples[0]["latency_s_p50"] == 1.0
    assert samples[1]["latency_s_p50"] == 3.0 and samples[1]["latency_s_p95"] == pytest.approx(3.9)


def test_a_progress_line_names_the_time_queues_cache_and_memory():
    from clients.soak_bench import progress_line

    row = {
        "t_s": 330.0,
        "edge_queued": 2,
        "cloud_queued": 5,
        "cache_entries": 41,
        "rss_mib:CloudRefiner:1": 600.0,
        "rss_mib:EdgePreviewer:2": 400.0,
    }
    line = progress_line(row, duration_s=1800.0)
    assert line == "soak 5.5/30 min: edge queued 2, cloud queued 5, cache 41 previews, replicas' RSS 1000 MiB"
