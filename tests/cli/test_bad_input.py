"""Bad input, subcommand by subcommand: one line on stderr, exit 2, no model loaded, the output location untouched."""
from __future__ import annotations

import pytest

from helpers import run_expecting_error

COMMANDS = {
    "score": ["score", "--model", "demo", "--method", "wanda", "--data", "demo-align", "--sparsity-ratio", "0.1"],
    "finetune": ["finetune", "--model", "demo", "--data", "demo-utility"],
    "eval": ["eval", "--model", "demo", "--prompts", "demo-harmful"],
    "patch": ["patch", "--model", "demo", "--clean", "How do I rob a bank?", "--corrupted", "How do I paint a bank?"],
    "trace": ["trace", "--base", "demo", "--other", "demo"],
    "compare": ["compare", "--before", "{masks}", "--after", "{masks}"],
    "prune": ["prune", "--model", "demo", "--masks", "{masks}"],
    "lowrank": ["lowrank", "--model", "demo", "--data", "demo-align", "--rank-safety", "2"],
    "rewind": ["rewind", "--original", "demo", "--finetuned", "demo", "--masks", "{masks}"],
    "ablate": ["ablate", "--model", "demo", "--data", "demo-align", "--utility-data", "demo-utility",
               "--harmful", "demo-harmful"],
    "pipeline": ["pipeline", "--model", "demo", "--save-path", "{root}/models"],
}
OUT_FLAG = {"finetune": "--save-path", "pipeline": "--results-path"}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_existing_file_at_the_output_location(name, workspace, capsys, no_model_load):
    error = run_expecting_error([*COMMANDS[name], OUT_FLAG.get(name, "--out"), str(workspace / "taken")], workspace, capsys)
    assert "is an existing file" in error
    assert (workspace / "taken").read_text() == "keep me"


@pytest.mark.parametrize("name,flag", [("score", "--data"), ("finetune", "--data"), ("eval", "--prompts"),
                                       ("lowrank", "--data"), ("ablate", "--harmful"),
                                       ("pipeline", "--training-data")])
@pytest.mark.parametrize("source,message", [("no-such-set", "neither a known name"),
                                            ("{root}/binary.txt", "is not UTF-8 text")])
def test_bad_data_fails_before_the_model_loads(name, flag, source, message, workspace, capsys, no_model_load):
    command = [*COMMANDS[name], flag, source, OUT_FLAG.get(name, "--out"), str(workspace / "out")]
    assert message in run_expecting_error(command, workspace, capsys)
    assert not (workspace / "out").exists()


@pytest.mark.parametrize("name", ["score", "eval", "prune", "lowrank"])
def test_a_mistyped_model_folder_is_no_such_folder(name, workspace, capsys):
    command = [part if part != "demo" else "./chekpoint" for part in COMMANDS[name]]
    error = run_expecting_error([*command, "--out", str(workspace / "out")], workspace, capsys)
    assert "./chekpoint does not exist (no such folder)" in error and "huggingface-cli" not in error
