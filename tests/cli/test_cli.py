"""The console script: help, option spelling, DeepSpeed's --local_rank, one-line errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO
from safeneurons.cli import STAGES, normalize_option_spelling


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safeneurons.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_help_lists_every_stage():
    result = _cli("--help")
    assert result.returncode == 0
    assert all(name in result.stdout for name in STAGES)


def test_option_spelling_and_local_rank_are_normalised():
    argv = ["pipeline", "--prune_method", "wandg", "--sparsity_ratio=0.1", "--local_rank=3", "--data",
            "my_file.csv", "--local-rank", "2", "--results_path", "x"]
    assert normalize_option_spelling(argv) == ["pipeline", "--prune-method", "wandg", "--sparsity-ratio=0.1",
                                               "--data", "my_file.csv", "--results-path", "x"]


def test_errors_are_one_line_with_exit_code_two(tmp_path):
    result = _cli("demo-model")
    assert result.returncode == 2 and "--out" in result.stderr


def test_console_script_is_installed():
    result = subprocess.run(["safeneurons", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "rank=0 world_size=1" in result.stdout


def test_plan_json_prints_only_json_on_stdout():
    """No library banner (DeepSpeed's accelerator warning) before the JSON: `plan --json | python -m json.tool`."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "safeneurons.cli", "plan", "--model", "demo", "--nodes", "1",
                             "--gpus-per-node", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["model"]["name"] == "demo"


def test_every_option_with_a_default_states_it():
    import argparse

    from safeneurons import cli

    missing = []
    for name in cli.STAGES:
        parser = cli.build_parser(name)
        sub = parser._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction,
                                                                 argparse._StoreFalseAction)):
                continue
            if action.default not in (None, [], ()) and "default" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing


def test_help_lists_the_commands_without_importing_torch():
    code = ("import sys\nsys.argv = ['safeneurons', '--help']\nfrom safeneurons.cli.app import run_as_script\n"
            "try:\n    run_as_script()\nexcept SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "finetune" in result.stdout and "trace" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "torch imported: False"


ONE_NAME = [  # (command and its required options, the canonical flag, the older name it keeps as an alias)
    (["score", "--model", "demo", "--data", "demo-align", "--out", "o"], "--score-method", "--method", "wanda"),
    (["pipeline"], "--score-method", "--prune-method", "wanda"),
    (["pipeline"], "--score-method", "--prune_method", "wanda"),  # the seed's spelling
    (["ablate", "--model", "demo", "--out", "o"], "--selections", "--methods", "top"),
    (["ablate", "--model", "demo", "--out", "o"], "--harmful-data", "--harmful", "x"),
    (["ablate", "--model", "demo", "--out", "o"], "--eval-limit", "--limit", "7"),
    (["eval", "--model", "demo", "--out", "o"], "--harmful-data", "--prompts", "x"),
    (["eval", "--model", "demo", "--out", "o"], "--harmless-data", "--harmless", "x"),
    (["eval", "--model", "demo", "--out", "o"], "--eval-limit", "--limit", "7"),
    (["eval", "--model", "demo", "--out", "o"], "--eval-batch-size", "--batch-size", "7"),
    (["patch", "--model", "demo", "--out", "o"], "--patch-method", "--method", "attribution"),
    (["patch", "--model", "demo", "--out", "o"], "--harmful-data", "--harmful", "x"),
    (["defend", "--model", "demo", "--out", "o"], "--defence", "--method", "resta"),
    (["defend", "--defence", "resta", "--out", "o"], "--model", "--finetuned", "demo"),
    (["neurons", "--model", "demo", "--base-model", "demo-base", "--out", "o"], "--harmful-data", "--prompts", "x"),
    (["neurons", "--model", "demo", "--base-model", "demo-base", "--out", "o"], "--eval-batch-size", "--batch-size",
     "7"),
    (["direction", "--model", "demo", "--out", "o"], "--eval-batch-size", "--batch-size", "7"),
    (["safety-layers", "--model", "demo", "--harmful-data", "x", "--harmless-data", "y", "--out", "o"],
     "--eval-limit", "--limit", "7"),
    (["trace", "--other", "demo", "--out", "o"], "--model", "--base", "demo-base"),
]


@pytest.mark.parametrize("command, canonical, alias, value", ONE_NAME, ids=lambda item: str(item))
def test_one_name_per_concept_and_the_older_names_as_aliases(command, canonical, alias, value):
    """The canonical flag and its alias set the same option; the help shows the canonical name first."""
    from safeneurons.cli.app import parse_command_line

    _, by_canonical = parse_command_line(normalize_option_spelling([*command, canonical, value]))
    _, by_alias = parse_command_line(normalize_option_spelling([*command, alias, value]))
    assert vars(by_canonical) == vars(by_alias)
    assert value in (str(item) for item in vars(by_canonical).values())
