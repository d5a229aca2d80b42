"""Bad input, subcommand by subcommand: one line on stderr, exit 2, no model loaded, the output location untouched."""
from __future__ import annotations

import pytest

from safeneurons import cli, models
from safeneurons.masks import save_masks


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.fixture
def workspace(tmp_path, demo_model):
    save_masks({"model.layers.0.mlp.up_proj.weight": demo_model.model.layers[0].mlp.up_proj.weight != 0},
               tmp_path / "masks")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / "taken").write_text("keep me")
    return tmp_path


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


def _run(command: list[str], workspace, capsys) -> str:
    argv = [part.replace("{masks}", str(workspace / "masks")).replace("{root}", str(workspace)) for part in command]
    capsys.readouterr()
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_existing_file_at_the_output_location(name, workspace, capsys, no_model_load):
    error = _run([*COMMANDS[name], OUT_FLAG.get(name, "--out"), str(workspace / "taken")], workspace, capsys)
    assert "is an existing file" in error
    assert (workspace / "taken").read_text() == "keep me"


@pytest.mark.parametrize("name,flag", [("score", "--data"), ("finetune", "--data"), ("eval", "--prompts"),
                                       ("lowrank", "--data"), ("ablate", "--harmful"),
                                       ("pipeline", "--training-data")])
@pytest.mark.parametrize("source,message", [("no-such-set", "neither a known name"),
                                            ("{root}/binary.txt", "is not UTF-8 text")])
def test_bad_data_fails_before_the_model_loads(name, flag, source, message, workspace, capsys, no_model_load):
    command = [*COMMANDS[name], flag, source, OUT_FLAG.get(name, "--out"), str(workspace / "out")]
    assert message in _run(command, workspace, capsys)
    assert not (workspace / "out").exists()


@pytest.mark.parametrize("name", ["score", "eval", "prune", "lowrank"])
def test_a_mistyped_model_folder_is_no_such_folder(name, workspace, capsys):
    command = [part if part != "demo" else "./chekpoint" for part in COMMANDS[name]]
    error = _run([*command, "--out", str(workspace / "out")], workspace, capsys)
    assert "./chekpoint does not exist (no such folder)" in error and "huggingface-cli" not in error
