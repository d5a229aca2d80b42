"""`--config FILE.yaml`: the file's keys are the command's options, the command line wins, every run writes the
config.yaml that runs it again (the demo study re-runs from it to identical results), bad files fail in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import assert_tracked_like_the_report, tensorboard_scalars
from safeneurons import cli
from safeneurons.cli.app import check_command

REPO = Path(__file__).resolve().parents[2]
SCORE = ["score", "--model", "demo", "--score-method", "wandg", "--data", "demo-align", "--nsamples", "4"]


def write(path: Path, values: dict | str) -> str:
    path.write_text(values if isinstance(values, str) else yaml.safe_dump(values))
    return str(path)


def test_a_config_file_gives_the_same_run_as_its_flags_and_the_command_line_wins(tmp_path):
    flags = check_command([*SCORE, "--sparsity-ratio", "0.05", "--out", str(tmp_path / "a")])
    config = write(tmp_path / "score.yaml", {"model": "demo", "score_method": "wandg", "data": "demo-align",
                                            "nsamples": 4, "sparsity_ratio": 0.05, "out": str(tmp_path / "a")})
    assert check_command(["score", "--config", config]) == flags
    assert check_command(["score", "--config", config, "--sparsity-ratio", "0.2"]).sparsity_ratio == 0.2
    aliases = write(tmp_path / "aliases.yaml", {"method": "wanda", "results_path": str(tmp_path / "b")})
    assert check_command([*SCORE[:3], "--data", "demo-align", "--config", aliases]).method == "wanda"


def test_a_finished_run_writes_the_config_that_runs_it_again(tmp_path):
    assert cli.main([*SCORE, "--out", str(tmp_path / "first")]) == 0
    written = tmp_path / "first" / "config.yaml"
    values = yaml.safe_load(written.read_text())
    assert (values["score_method"], values["nsamples"], values["out"], values["sequential"]) == (
        "wandg", 4, str(tmp_path / "first"), False)
    assert "safeneurons score --config" in written.read_text().splitlines()[1]
    assert cli.main(["score", "--config", str(written), "--out", str(tmp_path / "again")]) == 0
    for name in ("masks.safetensors",):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


@pytest.mark.parametrize("values,message", [
    ({"sparsity_ratoi": 0.1}, "unknown key 'sparsity_ratoi' for `score` (did you mean sparsity_ratio?)"),
    ({"nsamples": 0.5}, "nsamples is 0.5; expected an integer"),
    ({"nsamples": "many"}, "nsamples is 'many'; expected an integer"),
    ({"accumulate_dtype": "double"}, "accumulate_dtype is 'double'; expected one of fixed, exact, float32, model"),
    ({"sequential": 1}, "sequential is 1; expected true or false"),
    ({"sparsity_ratio": [0.1, 0.2]}, "sparsity_ratio is [0.1, 0.2]; expected one a number"),
    ({"sparsity_ratio": 1.5}, "must lie in (0, 1) (set by sparsity_ratio in config file"),
    ("a: [\n", "is not valid YAML at line 2"),
    ("- 1\n- 2\n", "holds a list; expected a mapping of option: value"),
])
def test_a_bad_config_file_is_one_line_naming_the_key_and_the_file(values, message, tmp_path, capsys):
    config = write(tmp_path / "bad.yaml", values)
    assert cli.main([*SCORE, "--config", config, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error and config in error, error
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert cli.main([*SCORE, "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"safeneurons: error: config file {tmp_path / 'nope.yaml'} does not exist"


def test_a_switch_off_flag_round_trips(tmp_path):
    """`--no-random-control` is the key no_random_control: true (not the dest's inverted value)."""
    config = write(tmp_path / "p.yaml", {"no_random_control": True})
    assert check_command(["pipeline", "--config", config]).random_control is False
    assert check_command(["pipeline", "--config", write(tmp_path / "q.yaml", {"no_random_control": False})]
                         ).random_control is True


def test_the_shipped_recipes_are_valid_and_the_demo_ones_are_the_built_in_studies():
    recipes = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        command = {"study": "pipeline", "study-full": "pipeline"}.get(recipe.stem, recipe.stem.split("-")[0])
        check_command([command, "--config", str(recipe)])
    assert check_command(["pipeline", "--config", str(REPO / "configs/demo/study.yaml")]) == check_command(
        ["pipeline"])
    assert check_command(["pipeline", "--config", str(REPO / "configs/demo/study-full.yaml")]) == check_command(
        ["pipeline", "--study", "full"])


SMALL_STUDY = ["--sparsity-ratio", "0.05", "--nsamples", "8", "--finetune-nsamples", "16", "--num-epochs", "1",
               "--eval-limit", "6", "--perplexity-samples", "4", "--max-new-tokens", "40", "--eval-every", "2",
               "--curve-limit", "6", "--curve-max-new-tokens", "8", "--seeds", "0", "--attacks", "benign",
               "--no-random-control"]


@pytest.mark.slow
def test_the_demo_study_re_runs_from_its_config_to_identical_results(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert cli.main(["pipeline", "--results-path", str(first / "results"), "--save-path", str(first / "models"),
                     *SMALL_STUDY, "--report-to", "tensorboard"]) == 0
    config = first / "results" / "config.yaml"
    assert yaml.safe_load(config.read_text())["model"] == "demo"  # the profile's choice, recorded
    assert cli.main(["pipeline", "--config", str(config), "--results-path", str(again / "results"),
                     "--save-path", str(again / "models")]) == 0

    def summary(root: Path) -> dict:
        values = json.loads((root / "results" / "analysis_summary.json").read_text())
        del values["costs"]  # wall-clock seconds, the one part of a study that is not reproducible
        values["settings"] = {key: value for key, value in values["settings"].items()
                              if key not in ("results_path", "save_path")}
        return values

    assert summary(first) == summary(again)
    for run in ("benign_plain_s0", "benign_safety_frozen_s0"):
        assert (first / "models" / run / "model.safetensors").read_bytes() == (
            again / "models" / run / "model.safetensors").read_bytes()
        evaluations = [json.loads((root / "results" / f"eval_{run}" / "eval.json").read_text())
                       for root in (first, again)]
        assert [Path(evaluation.pop("model")).name for evaluation in evaluations] == [run, run]
        assert evaluations[0] == evaluations[1]  # the same generations, verdicts and perplexity
        assert_tracked_like_the_report(first / "results" / "runs" / run, json.loads(
            (first / "results" / f"finetune_{run}" / "freeze_report.json").read_text()), events="")
    study = tensorboard_scalars(first / "results" / "runs" / "study")
    arms = summary(first)["arms"]
    assert study["study/plain/refusal_rate"] == [(0, pytest.approx(arms["plain"]["refusal_rate"]))]
    assert set(study) == {f"study/{arm}/{key}" for arm, row in arms.items() for key, value in row.items()
                          if isinstance(value, (int, float)) and not isinstance(value, bool)}
