"""Where the benches write by default: one folder per bench under `bench_results/` (git-ignored), so a
user finds every bench's JSON, CSV and plots in one place and two benches never overwrite each other."""

BENCH_RESULTS_DIR = "bench_results"


def bench_results_dir(bench: str) -> str:
    """The default output folder of a bench, e.g. `bench_results/preview`."""
    return f"{BENCH_RESULTS_DIR}/{bench}"
