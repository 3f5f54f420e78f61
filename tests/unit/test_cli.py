"""The `diffusionx` command line as a user meets it: `--version`, one help page per command and bench in
which every option says what it does, and the default output folder of each bench."""

from __future__ import annotations

import argparse
import json

import pytest

import diffusionx
from diffusionx import cli

BENCHES = ("preview", "refine", "compare", "autoscale", "shed", "faults", "state-memory")
PREDICTOR = ("label", "train", "eval")
COMMANDS = (
    [[name] for name in cli.SUBCOMMANDS if name not in ("bench", "predictor")]
    + [["bench", name] for name in BENCHES]
    + [["predictor", name] for name in PREDICTOR]
    + [["bench"], ["predictor"]]
)


def help_of(argv: list[str], monkeypatch, capsys) -> tuple[argparse.ArgumentParser, str]:
    """Runs `diffusionx ARGV --help`; returns the parser that printed the help and the text."""
    printed: list[argparse.ArgumentParser] = []
    format_help = argparse.ArgumentParser.format_help

    def recording(parser: argparse.ArgumentParser) -> str:
        printed.append(parser)
        return format_help(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", recording)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert len(printed) == 1, f"{argv}: {len(printed)} help pages printed"
    return printed[0], capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffusionx {diffusionx.__version__}"


def test_the_top_help_lists_every_command_with_its_help(monkeypatch, capsys):
    _, text = help_of([], monkeypatch, capsys)
    for name, (_, summary) in cli.SUBCOMMANDS.items():
        assert f"  {name}" in text and summary in text
    assert "--version" in text
    # no arguments: the same page on stdout, and the exit status of a usage error
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_option_of_every_command_has_help(argv, monkeypatch, capsys):
    parser, _ = help_of(argv, monkeypatch, capsys)
    assert parser.prog == "diffusionx " + " ".join(argv)
    assert parser.description, f"{parser.prog}: no description"
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{parser.prog} {name}: no help text"
        assert not action.help.startswith("(default"), f"{parser.prog} {name}: help is only its default"
        if isinstance(action, argparse._SubParsersAction):  # each sub-command's line in the list
            for choice in action._choices_actions:
                assert choice.help and choice.help.strip(), f"{parser.prog} {choice.dest}: no help text"


BENCH_OUT = {  # command -> the folder its --out defaults to
    ("bench", "compare"): "bench_results/compare",
    ("bench", "autoscale"): "bench_results/autoscale",
    ("bench", "shed"): "bench_results/shed",
    ("bench", "faults"): "bench_results/faults",
    ("bench", "state-memory"): "bench_results/state-memory",
    ("gpu-bench",): "bench_results/gpu",
    ("loadgen",): "bench_results/loadgen",
}


@pytest.mark.parametrize("argv", BENCH_OUT, ids=" ".join)
def test_every_bench_writes_under_bench_results_by_default(argv, monkeypatch, capsys):
    parser, _ = help_of(list(argv), monkeypatch, capsys)
    (out,) = [action for action in parser._actions if "--out" in action.option_strings]
    assert out.default == BENCH_OUT[argv] and f"{BENCH_OUT[argv]}/" in out.help


def test_bench_preview_and_refine_write_under_their_own_folder():
    from clients.bench import parse_args

    assert parse_args(["preview"]).out == "bench_results/preview"
    assert parse_args(["refine", "--strength", "0.3"]).out == "bench_results/refine"
    assert parse_args(["preview", "--out", "elsewhere"]).out == "elsewhere"


def test_bench_state_memory_runs_as_a_subcommand_and_writes_its_json(tmp_path, capsys):
    assert cli.main(["bench", "state-memory", "--previews", "20", "--side", "8", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "state_memory.json").read_text())
    assert result["previews"] == 20 and result["kept"] + result["evicted"] == 20
    assert f"wrote {tmp_path / 'state_memory.json'}" in capsys.readouterr().out


def test_bench_autoscale_says_it_stops_only_the_ray_processes_it_started(monkeypatch, capsys):
    _, text = help_of(["bench", "autoscale"], monkeypatch, capsys)
    assert "stopping ends only the processes it started" in " ".join(text.split())


def test_predictor_without_a_command_prints_its_commands(capsys):
    from diffusionx.experiments.predictor import cli as predictor_cli

    assert cli.main(["predictor"]) == 2  # the help, with the exit status of a usage error
    out = capsys.readouterr().out
    assert all(
        name in out and text in " ".join(out.split()) for name, (_, text) in predictor_cli.SUBCOMMANDS.items()
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predictor", "tune"])
    assert exit_info.value.code == 2 and "invalid choice: 'tune'" in capsys.readouterr().err
