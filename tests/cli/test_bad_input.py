"""Bad input, subcommand by subcommand: one line on stderr, exit 2, no model loaded, the output location untouched."""
from __future__ import annotations

import shutil

import pytest

from helpers import run_expecting_error
from safeneurons.models.loading import demo_model_dir

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


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_output_where_no_folder_can_be_made_fails_before_any_work(name, workspace, capsys, no_model_load):
    """/proc passes the access check (root may write anywhere) but refuses new folders."""
    error = run_expecting_error([*COMMANDS[name], OUT_FLAG.get(name, "--out"), "/proc/safeneurons-out"], workspace,
                                capsys)
    assert "no folder can be created in /proc" in error


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


@pytest.mark.parametrize("name", ["score", "eval", "prune", "lowrank", "patch"])
def test_a_truncated_model_file_is_one_line_naming_it(name, workspace, capsys):
    model = workspace / "model"
    shutil.copytree(demo_model_dir(), model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(3_000_000)
    command = [str(model) if part == "demo" else part for part in COMMANDS[name]]
    error = run_expecting_error([*command, "--out", str(workspace / "out")], workspace, capsys)
    assert f"model file {weights} is damaged or incomplete" in error
    assert not (workspace / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--metric", "direction", "--direction", "{root}/missing.pt"], "does not exist (a refusal direction file"),
    (["--layers", "0,99"], "--layers 99 does not exist; the model has layers 0..5"),
])
def test_patch_checks_that_need_no_weights_come_before_the_model_loads(extra, message, workspace, capsys,
                                                                       no_model_load):
    error = run_expecting_error([*COMMANDS["patch"], *extra, "--out", str(workspace / "out")], workspace, capsys)
    assert message in error


def test_a_mask_file_whose_data_fails_its_checksum_stops_finetune_before_the_model_loads(workspace, capsys,
                                                                                         no_model_load):
    path = workspace / "masks" / "masks.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one mask bit flipped in the data: the header and the file size stay valid
    path.write_bytes(bytes(data))
    error = run_expecting_error([*COMMANDS["finetune"], "--masks", "{masks}", "--save-path", str(workspace / "out")],
                                workspace, capsys)
    assert "does not match its checksum" in error


@pytest.mark.parametrize("extra, message", [
    (["--dtype", "bfloat16"], "--dtype bfloat16 applies to the ZeRO-3 prune"),
    (["--data-dir", "/nonexistent"], "--data-dir /nonexistent: prune reads no data set"),
])
def test_prune_refuses_options_it_would_ignore(extra, message, workspace, capsys, no_model_load):
    error = run_expecting_error([*COMMANDS["prune"], *extra, "--out", str(workspace / "out")], workspace, capsys)
    assert message in error


def test_masks_of_another_model_stop_finetune_before_the_model_loads(workspace, capsys, no_model_load):
    """Shapes come from the mask file's header and the model's config: a deeper model's mask names a layer the
    demo does not have."""
    import torch

    from safeneurons.masks.io import save_masks

    save_masks({"model.layers.99.mlp.up_proj.weight": torch.ones(2, 2, dtype=torch.bool)}, workspace / "other")
    error = run_expecting_error([*COMMANDS["finetune"], "--masks", str(workspace / "other"), "--save-path",
                                 str(workspace / "out")], workspace, capsys)
    assert "mask 'model.layers.99.mlp.up_proj.weight' names no parameter of the model" in error
    assert not (workspace / "out").exists()


@pytest.mark.parametrize("out", [".", "", "..", "sub/.."])
@pytest.mark.parametrize("name", [*COMMANDS, "info"])
def test_the_current_folder_or_one_above_is_no_output(name, out, workspace, capsys, no_model_load, monkeypatch):
    """One rule for every command, before any work: a result is published by renaming a folder into place."""
    monkeypatch.chdir(workspace)
    before = sorted(path.name for path in workspace.iterdir())
    error = run_expecting_error([*COMMANDS.get(name, [name]), OUT_FLAG.get(name, "--out"), out], workspace, capsys)
    assert "is not a results folder of its own" in error or (out == "" and "is required" in error)
    assert sorted(path.name for path in workspace.iterdir()) == before


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--learning-rate", "abc"], "safeneurons finetune: error: argument --learning-rate: invalid float"),
    (["plan", "--offload", "bogus"], "safeneurons plan: error: argument --offload: invalid choice: 'bogus'"),
    (["score", "--model", "demo"], "safeneurons score: error: the following arguments are required"),
])
def test_argument_errors_are_one_line(argv, message, capsys):
    from safeneurons import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith(message) and error.count("\n") == 1, error


def test_version_and_what_the_tool_does(capsys):
    from safeneurons import __version__, cli

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"safeneurons {__version__}"
    cli.main([])
    assert "find the weights and neurons that carry an LLM's safety alignment" in " ".join(capsys.readouterr().out.split())
