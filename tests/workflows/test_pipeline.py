"""The pipeline: settings resolution, the verdict, and the whole study end to end on the demo model (1 and 2 ranks)."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_ranks
from safeneurons import cli
from safeneurons.cli.pipeline import config_from_args
from safeneurons.models.loading import demo_model_dir
from safeneurons.workflows.pipeline.report import ARM_LABELS
from safeneurons.workflows.pipeline.settings import ARMS, ATTACKS, DONE_FILE, PipelineConfig

SMALL = ["--sparsity-ratio", "0.05", "--nsamples", "8", "--finetune-nsamples", "16", "--num-epochs", "1",
         "--eval-limit", "6", "--perplexity-samples", "4", "--max-new-tokens", "40", "--eval-every", "2",
         "--curve-limit", "6", "--curve-max-new-tokens", "8", "--seeds", "0,1"]
ONE_RUN = ["--seeds", "0", "--attacks", "benign"]  # later options win: the first seed of the benign attack only
ORIGINAL_KEYS = {"original_safety_critical_count": int, "new_safety_critical_count": int, "total_neurons": int,
                 "prune_method": str, "prune_data": str, "sparsity_ratio": float, "training_data": str,
                 "num_epochs": int, "learning_rate": float}
RUNS = [f"{attack}_{arm}_s{seed}" for attack in ATTACKS for arm in ARMS[1:] for seed in (0, 1)]
# The demo profile chooses each attack's rate from plain first (--attack-rates): with 4 steps K = 1, so the largest
# candidate, demo's 1e-3, passes at once
CALIBRATION = [f"calibrate_{attack}_lr0.001" for attack in ATTACKS]
STAGES = [*CALIBRATION, "score", "score_setdiff", "score_random", *(f"finetune_{run}" for run in RUNS), "rescore",
          "compare", "eval_base", *(f"eval_{run}" for run in RUNS)]


def _settings(*argv: str) -> PipelineConfig:
    return config_from_args(cli.build_parser("pipeline").parse_args(cli.normalize_option_spelling(["pipeline", *argv])))


def test_no_arguments_on_a_cpu_machine_run_the_demo_profile():
    settings = _settings()
    assert (settings.model, settings.profile, settings.prune_data, settings.training_data) == (
        "demo", "demo", "demo-align", "demo-utility")
    assert (settings.prune_method, settings.sparsity_ratio, settings.seed, settings.results_path) == (
        "wandg", 0.1, 42, "./results")


def test_an_explicit_model_keeps_the_original_defaults_and_given_options_win(tmp_path):
    settings = _settings("--model", str(tmp_path), "--num_epochs", "1", "--harmless-data", "none")
    assert (settings.profile, settings.prune_data, settings.training_data, settings.learning_rate) == (
        "original", "align", "alpaca_cleaned_no_safety", 2e-5)
    assert (settings.num_epochs, settings.batch_size, settings.max_length, settings.cache_dir) == (
        1, 4, 512, "llm_weights")
    assert settings.harmless_data is None


def test_demo_chat_is_the_demo_and_the_score_method_is_checked():
    assert _settings("--model", "demo-chat").prune_data == "demo-align"  # one model, two names, one profile
    with pytest.raises(Exception, match="--score-method 'bogus' is not one of wanda, wandg, random"):
        _settings("--score-method", "bogus")


def test_a_missing_model_is_named_before_the_data(tmp_path, capsys):
    """The model comes first: a missing folder is what the user must fix, not the data its profile would use."""
    assert cli.main(["pipeline", "--model", str(tmp_path / "no-such-dir"), "--results-path", str(tmp_path / "r"),
                     "--save-path", str(tmp_path / "m")]) == 2
    assert "no-such-dir does not exist (no such folder)" in capsys.readouterr().err


def test_bad_settings_are_one_clear_error():
    with pytest.raises(Exception, match="sparsity-ratio"):
        _settings("--sparsity-ratio", "1.5")


def _pipeline_args(root: Path, *extra: str) -> list[str]:
    return ["pipeline", "--results-path", str(root / "results"), "--save-path", str(root / "models"), *SMALL, *extra]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    assert cli.main(_pipeline_args(root)) == 0
    return root


def _check_summary(results: Path, arms: list[str]) -> dict:
    summary = json.loads((results / "analysis_summary.json").read_text())
    assert all(isinstance(summary[key], kind) for key, kind in ORIGINAL_KEYS.items()), summary
    assert (summary["prune_method"], summary["prune_data"], summary["training_data"]) == (
        "wandg", "demo-align", "demo-utility")
    assert summary["original_safety_critical_count"] == summary["new_safety_critical_count"] > 0
    assert list(summary["arms"]) == arms
    for row in summary["arms"].values():
        assert 0.0 <= row["refusal_rate"] <= 1.0 and 0.0 <= row["asr"] <= 1.0 and row["perplexity"] >= 1.0
    assert summary["arms"]["base"]["refusal_rate"] >= 0.8  # demo-chat refuses the harmful prompts
    return summary


def _frozen_entries_unchanged(root: Path, arm: str, mask_file: str | None) -> None:
    base = load_file(demo_model_dir() / "model.safetensors")
    tuned = load_file(root / "models" / f"benign_{arm}_s0" / "model.safetensors")
    masks = torch.load(root / "results" / mask_file, weights_only=True) if mask_file else None
    stage = {"safety_frozen": "score", "setdiff_frozen": "score_setdiff", "random_frozen": "score_random"}[arm]
    from safeneurons.masks.io import load_masks

    masks = masks or load_masks(root / "results" / stage)
    moved_free = 0
    for name, mask in masks.items():
        assert torch.equal(base[name][mask], tuned[name][mask]), name
        moved_free += int((base[name][~mask] != tuned[name][~mask]).sum())
    assert moved_free > 0  # the free weights did train


@pytest.mark.slow
def test_pipeline_end_to_end_on_the_demo_model(single_run):
    results = single_run / "results"
    summary = _check_summary(results, list(ARMS))
    for name in ("original_safety_masks.pt", "new_safety_masks.pt", "report.md", "arms.png", "curves.png",
                 "compare/overlap_per_layer.png"):
        assert (results / name).is_file(), name
    _check_study(results, summary)
    original = torch.load(results / "original_safety_masks.pt", weights_only=True)
    assert sum(int(mask.sum()) for mask in original.values()) == summary["original_safety_critical_count"]
    assert all(mask.dtype == torch.bool for mask in original.values())
    _frozen_entries_unchanged(single_run, "safety_frozen", "original_safety_masks.pt")
    _frozen_entries_unchanged(single_run, "random_frozen", None)
    _frozen_entries_unchanged(single_run, "setdiff_frozen", None)
    assert summary["arms"]["safety_frozen"]["max_abs_change_frozen"] == 0.0
    assert summary["arms_weight_drift"]["safety_frozen"]["max_abs_change_frozen"] == 0.0
    report = (results / "report.md").read_text()
    assert "## Arms" in report
    plain = next(line for line in report.splitlines() if line.startswith("| plain |")).split(" | ")
    assert plain[5:7] == ["–", "–"] and float(plain[7].rstrip(" |")) > 0  # nothing frozen; the safety set moved
    assert "for 1 epoch at" in report and "measured every 2 optimizer steps" in report
    assert "setdiff" not in summary["verdict"] and "set-difference frozen" in summary["verdict"]
    assert summary["total_weights"] == summary["total_neurons"] == sum(mask.numel() for mask in original.values())


def test_the_summary_piped_to_a_file_cuts_no_cell(single_run, capsys):
    """Not a terminal: rich's tables as wide as their cells (it used to cut intervals to "(0.00–0.0…")."""
    from safeneurons.workflows.pipeline.report import arm_table_rows, print_summary, study_table_rows

    summary = json.loads((single_run / "results" / "analysis_summary.json").read_text())
    print_summary(summary, single_run / "results", 1.0)
    printed = capsys.readouterr().out
    assert "…" not in printed
    cells = [cell for row in study_table_rows(summary) + arm_table_rows(summary["arms"]) for cell in row]
    assert all(cell in printed for cell in cells)


def _check_study(results: Path, summary: dict) -> None:
    """Both attacks, every fine-tuned arm, two seeds: the curves at steps 0, 2, 4 (their last point the run's end),
    the intervals computed from the per-seed values, and the seeds ordering the data differently."""
    from safeneurons.analysis.study import METRIC_BOUNDS, estimate

    study = summary["study"]
    assert study["seeds"] == [0, 1] and list(study["attacks"]) == list(ATTACKS)
    for attack, arms in study["attacks"].items():
        assert list(arms) == list(ARMS[1:])
        for arm, result in arms.items():
            assert result["seeds"] == 2 and [point["step"] for point in result["curve"]] == [0, 2, 4]
            for metric in ("refusal_rate", "asr", "perplexity"):
                expected = estimate(result["per_seed"][metric], METRIC_BOUNDS[metric])
                assert result[metric] == {**expected.__dict__}, (attack, arm, metric)
    losses = [json.loads((results / f"finetune_benign_plain_s{seed}" / "freeze_report.json").read_text())["loss_curve"]
              for seed in (0, 1)]
    assert losses[0] != losses[1]  # the seed orders the fine-tuning data
    report = (results / "report.md").read_text()
    assert "## The study" in report and "steps until refusal halves" in report and "curves.png" in report
    assert "harmful attack (2 seeds" in summary["verdict"]


@pytest.mark.slow
def test_rerun_with_the_same_arguments_skips_finished_stages(single_run, caplog):
    results = single_run / "results"
    before = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    outputs = (results / "eval_benign_plain_s0" / "eval.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="safeneurons"):
        assert cli.main(_pipeline_args(single_run)) == 0
    announced = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(announced) == len(STAGES)
    trials, stages = announced[:len(CALIBRATION)], announced[len(CALIBRATION):]
    assert all(line.startswith(f"attack strength ({attack}, learning rate 0.001)")
               for attack, line in zip(ATTACKS, trials)), trials
    assert all(re.match(rf"stage {number} of {len(stages)} \(\w+, \d+\.\d min into the study\)", line)
               for number, line in enumerate(stages, 1)), stages
    assert {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES} == before
    assert (results / "eval_benign_plain_s0" / "eval.json").stat().st_mtime_ns == outputs
    assert (results / "analysis_summary.json").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_under_two_ranks(single_run, tmp_path):
    """Every stage distributed; the inference stages layer-sharded (`--shard layers`: each rank one block of
    layers), whose masks and greedy generations must equal the 1-rank study's unsharded ones (data-parallel
    scoring's own 2-rank checks are in tests/scores)."""
    result = run_ranks(["safeneurons.cli", *_pipeline_args(tmp_path, "--no-random-control", "--shard", "layers",
                                                            *ONE_RUN)], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "results"
    summary = _check_summary(results, ["base", "plain", "safety_frozen", "setdiff_frozen"])
    _frozen_entries_unchanged(tmp_path, "safety_frozen", "original_safety_masks.pt")
    report = json.loads((results / "finetune_benign_safety_frozen_s0" / "freeze_report.json").read_text())
    one_rank = json.loads((single_run / "results" / "finetune_benign_safety_frozen_s0" / "freeze_report.json")
                          .read_text())
    # 16 samples, 4 per rank and step: 2 steps
    assert report["world_size"] == 2 and [p["step"] for p in report["refusal_curve"]] == [0, 2]
    assert report["refusal_curve"][0] == one_rank["refusal_curve"][0]  # the same model before training
    one_rank = torch.load(single_run / "results" / "original_safety_masks.pt", weights_only=True)
    two_ranks = torch.load(results / "original_safety_masks.pt", weights_only=True)
    assert one_rank.keys() == two_ranks.keys()
    assert all(torch.equal(one_rank[name], two_ranks[name]) for name in one_rank)  # sharded = unsharded, bit for bit
    assert json.loads((results / "score" / "score_summary.json").read_text())["layer_split"]["stages"] == 2
    base_one_rank = json.loads((single_run / "results" / "analysis_summary.json").read_text())["arms"]["base"]
    base_two_ranks = summary["arms"]["base"]
    assert base_two_ranks["perplexity"] == pytest.approx(base_one_rank.pop("perplexity"), rel=1e-9)  # sum order
    assert {key: base_two_ranks[key] for key in base_one_rank} == base_one_rank  # split prompts, same generations


@pytest.mark.slow
def test_a_deleted_output_reruns_its_stage_only(single_run):
    """A fine-tuned model folder removed after the run: only its fine-tuning stage runs again (the others are
    skipped), and the model comes back bit for bit."""
    results, model = single_run / "results", single_run / "models" / "benign_plain_s0"
    weights = load_file(model / "model.safetensors")
    before = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    shutil.rmtree(model)
    assert cli.main(_pipeline_args(single_run)) == 0
    after = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert [stage for stage in STAGES if after[stage] != before[stage]] == ["finetune_benign_plain_s0"]
    again = load_file(model / "model.safetensors")
    assert all(torch.equal(again[name], tensor) for name, tensor in weights.items())
    assert not (results / "finetune_benign_plain_s0" / "checkpoints").exists()  # removed once the model was saved


def test_fine_tuning_resumes_only_from_a_checkpoint_of_the_same_run(tmp_path, demo_tokenizer):
    from helpers import make_tiny_llama
    from safeneurons.finetune.config import FineTuneConfig
    from safeneurons.finetune.resume import run_settings
    from safeneurons.workflows.pipeline.study import resumable

    model = make_tiny_llama(demo_tokenizer, seed=1)
    model.save_pretrained(tmp_path / "m")
    demo_tokenizer.save_pretrained(tmp_path / "m")
    checkpoints = tmp_path / "ck"
    assert cli.main(["finetune", "--model", str(tmp_path / "m"), "--data", "demo-utility", "--nsamples", "8",
                     "--max-length", "32", "--batch-size", "4", "--checkpoint-dir", str(checkpoints),
                     "--save-every", "1", "--save-path", str(tmp_path / "out")]) == 0
    config = FineTuneConfig(data="demo-utility", nsamples=8, max_length=32, batch_size=4, seed=0)  # as the CLI
    assert resumable(checkpoints, run_settings(config, None))
    assert not resumable(checkpoints, run_settings(FineTuneConfig(**{**config.__dict__, "learning_rate": 1.0}), None))
    assert not checkpoints.exists()  # another run's checkpoints are removed, not resumed from


@pytest.mark.slow
def test_extension_arms_join_a_finished_study(single_run):
    """`--extension-arms all` on a finished run: only the new arms (and compare) run. LoRA protected keeps the
    safety set bit for bit and plain LoRA does not; the partial freeze moves it less than plain fine-tuning;
    dynamic freezing re-scored; the safety loss was recorded."""
    from safeneurons.masks.io import load_masks
    from safeneurons.workflows.pipeline.settings import EXTENSION_ARMS

    results = single_run / "results"
    before = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert cli.main(_pipeline_args(single_run, "--extension-arms", "all", "--rescore-every", "2", *ONE_RUN)) == 0
    after = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert [stage for stage in STAGES if after[stage] != before[stage]] == ["compare"]
    _check_summary(results, [*ARMS, *EXTENSION_ARMS])
    base = load_file(demo_model_dir() / "model.safetensors")
    masks = load_masks(results / "score")

    def model(arm: str) -> dict[str, torch.Tensor]:
        return load_file(single_run / "models" / f"benign_{arm}_s0" / "model.safetensors")

    def report(arm: str) -> dict:
        return json.loads((results / f"finetune_benign_{arm}_s0" / "freeze_report.json").read_text())

    protected, lora = model("lora_protected"), model("lora_plain")
    assert all(torch.equal(protected[name][mask], base[name][mask]) for name, mask in masks.items())
    adapted = [name for name in masks if "q_proj" in name or "v_proj" in name]
    assert adapted and all(not torch.equal(lora[name][masks[name]], base[name][masks[name]]) for name in adapted)

    def mean_drift(weights: dict[str, torch.Tensor]) -> float:
        return float(sum((weights[name][mask] - base[name][mask]).abs().sum() for name, mask in masks.items()))

    assert 0.0 < mean_drift(model("partial_frozen")) < mean_drift(model("plain"))
    assert [record["step"] for record in report("dynamic_frozen")["rescoring"]] == [2]
    assert len(report("safety_loss")["safety_loss_curve"]) == report("safety_loss")["steps"] == 4


@pytest.mark.slow
def test_defences_join_a_finished_study(single_run):
    """`--defences all` on a finished run: only the defences' stages (and compare) run. SPPFT's located layers stay
    bit for bit; RESTA is plain + (demo − demo-base); Antidote zeroes exactly int(0.1 × columns) of each row of
    plain's Linears; Safe LoRA changes only the matrices it projected of plain LoRA's model; Lisa and the
    constrained objective trained with the paper's settings; the report ranks every arm and prices it."""
    from safetensors.torch import load_file

    from safeneurons.workflows.pipeline.settings import DEFENCES

    results, models = single_run / "results", single_run / "models"
    before = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert cli.main(_pipeline_args(single_run, "--defences", "all", *ONE_RUN)) == 0
    after = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert [stage for stage in STAGES if after[stage] != before[stage]] == ["compare"]
    arms = [*ARMS, "safety_loss", "sppft", "lora_plain", *DEFENCES[1:]]
    summary = _check_summary(results, arms)
    demo, base = load_file(demo_model_dir() / "model.safetensors"), load_file(
        demo_model_dir("base") / "model.safetensors")

    def model(arm: str) -> dict[str, torch.Tensor]:
        return load_file(models / f"benign_{arm}_s0" / "model.safetensors")

    layers = json.loads((results / "safety_layers" / "safety_layers.json").read_text())["safety_layers"]
    sppft = model("sppft")
    inside = [name for name in demo if any(f"layers.{layer}." in name for layer in layers)]
    assert inside and all(torch.equal(sppft[name], demo[name]) for name in inside)
    assert any(not torch.equal(sppft[name], demo[name]) for name in demo if name not in inside)
    plain, resta = model("plain"), model("resta")
    for name, tensor in plain.items():
        assert torch.allclose(resta[name], tensor + (demo[name] - base[name]), atol=1e-6, rtol=0), name
    antidote = model("antidote")
    linears = [name for name in plain if ".layers." in name and name.endswith("proj.weight")]
    for name in linears:
        zeroed = (antidote[name] == 0) & (plain[name] != 0)
        assert torch.equal(antidote[name][~zeroed], plain[name][~zeroed]), name
        pruned = int(plain[name].shape[1] * 0.1) if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj") else 0
        assert zeroed.sum(dim=1).tolist() == [pruned] * plain[name].shape[0], name  # the authors' q, k, v only
    lora, safe_lora = model("lora_plain"), model("safe_lora")
    repair = json.loads((results / "defend_benign_safe_lora_s0" / "defence.json").read_text())
    assert repair["source"] == str(models / "benign_lora_plain_s0")
    projected = set(repair["summary"]["projected"])
    assert all(torch.equal(safe_lora[name], lora[name]) != (name in projected) for name in lora)

    def run_settings(arm: str) -> dict:
        return json.loads((results / f"finetune_benign_{arm}_s0" / "freeze_report.json").read_text())["run_settings"]

    assert run_settings("lisa")["lisa_steps"] == [1, 9] and run_settings("constrained_sft")["constrained_betas"] == [
        0.5, 2.0, 0.1]
    costs = summary["costs"]["benign"]
    assert costs["plain"]["relative_to_plain"] == 1.0 and all(cost["seconds"] > 0 for cost in costs.values())  # CPU s
    assert costs["sppft"]["preparation_seconds"] > 0 and costs["resta"]["preparation_seconds"] is None
    report = (results / "report.md").read_text()
    assert "## Cost of each arm" in report and "| benign | RESTA |" in report and "## Attack strength" in report
    benign = summary["verdict"].split("Under the benign attack")[1]
    assert "Ranked by final refusal: " in benign and all(f". {ARM_LABELS[arm]} " in benign for arm in arms[1:])


@pytest.mark.slow
def test_the_direction_joins_a_finished_study(single_run):
    """`--direction` on a finished run: only its stage runs (and compare, whose arms an earlier test of this module
    may have extended); the report and the summary gain its section, which says plainly that the original's filter
    discarded every demo candidate."""
    results = single_run / "results"
    before = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert cli.main(_pipeline_args(single_run, "--direction")) == 0
    after = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert {stage for stage in STAGES if after[stage] != before[stage]} <= {"compare"}
    assert (results / "direction" / DONE_FILE).is_file()
    summary = json.loads((results / "analysis_summary.json").read_text())["direction"]
    assert summary["selected_despite_filter"] is True and summary["links"]["masks"].endswith("score")
    report = (results / "report.md").read_text()
    assert "## Refusal direction (base model)" in report and "discarded every candidate" in report


@pytest.mark.slow
def test_the_circuit_joins_a_finished_study(single_run):
    """`--circuit` on a finished run: only its stage runs (and compare); the summary and the report gain its section,
    with the circuit's nodes compared with the study's own safety mask."""
    results = single_run / "results"
    before = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert cli.main(_pipeline_args(single_run, "--circuit")) == 0
    after = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert {stage for stage in STAGES if after[stage] != before[stage]} <= {"compare"}
    summary = json.loads((results / "analysis_summary.json").read_text())["circuit"]
    assert summary["graph"]["edges"] == 1108 and summary["mask_overlap"]["selected_weights"] > 0
    assert set(summary["curves"]) == {"eap-ig", "eap", "nodes"} and summary["circuit"]["size"] > 0
    report = (results / "report.md").read_text()
    assert "## Refusal circuit (edges)" in report and "(circuit/faithfulness.png)" in report


@pytest.mark.slow
def test_neuron_patching_joins_a_finished_study(single_run):
    """`--neuron-patching` on a finished run: only its stage runs (and compare); the report gains the study's
    section with a verdict per ranking and direction, its table and its figure."""
    results = single_run / "results"
    before = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert cli.main(_pipeline_args(single_run, "--neuron-patching", "--neuron-fractions", "0.05,0.2")) == 0
    after = {stage: (results / stage / DONE_FILE).stat().st_mtime_ns for stage in STAGES}
    assert {stage for stage in STAGES if after[stage] != before[stage]} <= {"compare"}
    summary = json.loads((results / "analysis_summary.json").read_text())["neuron_patching"]
    assert (summary["chat_model"], summary["base_model"]) == ("demo", "demo-base")
    assert summary["config"]["fractions"] == [0.05, 0.2] and summary["config"]["limit"] == 6
    report = (results / "report.md").read_text()
    assert "## Safety neurons" in report and "(neuron_patching/neuron_patching.png)" in report
    verdicts = [line for line in report.splitlines() if line.startswith("- ") and "than random" in line]
    assert len(verdicts) == 2 * 4 and (results / "neuron_patching" / "neuron_patching.png").is_file()


def test_neuron_patching_needs_its_base_model(tmp_path):
    with pytest.raises(Exception, match="--neuron-patching needs --neuron-base-model"):
        _settings("--model", str(tmp_path), "--neuron-patching")
    with pytest.raises(Exception, match="fractions in"):
        _settings("--neuron-patching", "--neuron-fractions", "0.05,1.5")
    assert _settings("--neuron-patching").neuron_base_model == "demo-base"


@pytest.mark.parametrize("options, message", [
    (["--defences", "sppft,bogus"], "--defences 'bogus' is not one of sppft, safe_lora, lisa"),
    (["--defences", "resta", "--base-model", "none"], "--defences resta needs --base-model"),
    (["--defences", "safe_lora", "--base-model", "{other}"], "in --base-model but (714, 128) F32 in --model"),
    (["--defences", "antidote", "--harmful-training-data", "none", "--attacks", "benign"],
     "--defences antidote re-aligns on harmful prompts with harmful answers: give --harmful-training-data"),
    (["--defences", "lisa", "--deepspeed", str(Path(__file__).parents[2] / "ds_configs" / "zero2.json")],
     "is ZeRO stage 2"),
    (["--lisa-steps", "5"], "--lisa-steps '5': expected paper or A,F"),
    (["--attack-rates", "1e-3,-1"], "--attack-rates '1e-3,-1': expected distinct positive learning rates"),
    (["--attack-rates", "1e-3", "--eval-every", "0"], "--eval-every must be > 0"),
    (["--attack-halving-fraction", "0"], "--attack-halving-fraction=0.0 must lie in (0, 1]"),
])
def test_bad_defence_settings_are_one_line_before_any_model_loads(options, message, tmp_path, demo_tokenizer,
                                                                  capsys, no_model_load):
    from helpers import make_tiny_llama, run_expecting_error

    other = tmp_path / "other"
    make_tiny_llama(demo_tokenizer, seed=1, layers=3).save_pretrained(other)
    command = _pipeline_args(tmp_path, "--model", "demo", *[str(other) if option == "{other}" else option
                                                            for option in options])
    assert message in run_expecting_error(command, tmp_path, capsys)
    assert not (tmp_path / "results").exists() and not (tmp_path / "models").exists()


@pytest.mark.slow
def test_pipeline_on_the_mixture_of_experts_demo(tmp_path):
    """`--model demo-moe`: the whole study on a Mixtral, frozen expert slices bit-identical, and the report says
    which experts the safety-critical weights sit in."""
    from safeneurons.masks.io import load_masks
    from safeneurons.models.loading import resolve_model_name

    assert cli.main([*_pipeline_args(tmp_path, *ONE_RUN), "--model", "demo-moe"]) == 0
    results = tmp_path / "results"
    summary = json.loads((results / "analysis_summary.json").read_text())
    assert summary["model"] == "demo-moe" and summary["arms"]["base"]["refusal_rate"] >= 0.8
    experts = summary["experts"]
    assert set(experts) == {"safety", "set_difference"} and len(experts["safety"]) == 6  # every layer is MoE
    for record in experts["safety"].values():
        assert sum(record["score_share"]) == pytest.approx(1.0, abs=1e-4) and len(record["response_tokens"]) == 4
    assert "## Experts" in (results / "report.md").read_text()
    base = load_file(Path(resolve_model_name("demo-moe")) / "model.safetensors")
    tuned = load_file(tmp_path / "models" / "benign_safety_frozen_s0" / "model.safetensors")
    masks = load_masks(results / "score")
    name = "model.layers.2.mlp.experts.gate_up_proj"
    assert masks[name].dim() == 3 and masks[name].any()
    assert all(torch.equal(base[key][mask], tuned[key][mask]) for key, mask in masks.items())
    assert not torch.equal(base[name], tuned[name])  # the free expert weights trained
