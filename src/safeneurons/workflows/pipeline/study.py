"""The study: score, fine-tune each arm under each attack and seed, re-score, compare, evaluate."""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.interventions.antidote import AUTHORS_MODULES
from safeneurons.runtime import distributed
from safeneurons.workflows.pipeline.settings import (ARM_MASK_STAGE, ARMS, DEFAULT_ZERO3, POST_HOC_SOURCE, arm_options,
                                                     defence_arms, safety_layers_config)
from safeneurons.workflows.pipeline.stages import DEFENCE_FILE, Run, has_masks, model_files, source_run

if TYPE_CHECKING:
    from safeneurons.workflows.pipeline.settings import PipelineConfig

log = logging.getLogger(__name__)
TRACKING_DIR = "runs"  # RESULTS/runs/<run>: the tracked fine-tunes and the study's results


class Study:
    """The stages of one pipeline run, in order, and where their outputs live."""

    def __init__(self, settings: PipelineConfig, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.results = Path(settings.results_path)
        self.models = Path(settings.save_path)
        self.arms = [arm for arm in ARMS if arm != "random_frozen" or settings.random_control]
        self.arms += list(settings.extensions)
        self.arms += [arm for arm in defence_arms(settings) if arm not in self.arms]
        self.runs = [Run(attack, arm, seed) for attack in settings.attack_list for arm in self.arms[1:]
                     for seed in settings.seed_list]
        # the run whose safety-frozen model is re-scored and compared (the original extension's outputs)
        self.reference = (settings.attack_list[0], settings.seed_list[0])
        # each attack's learning rate: --learning-rate, or the one `calibrate` chooses from plain alone
        self.rates = {attack: settings.learning_rate for attack in settings.attack_list}
        self.calibration: dict[str, Any] = {}  # attack -> calibration.AttackStrengthResult (run.run_study)
        self.shard = inference_shard(settings, device)  # collective


    def masks_of(self, stage: str) -> Path:
        return self.results / stage  # a folder: masks.safetensors, or shards and their index under N ranks

    def model_of(self, run: Run | None) -> str:
        return self.settings.model if run is None else str(self.models / run.key)

    def reference_run(self, arm: str) -> Run:
        return Run(self.reference[0], arm, self.reference[1])

    def attack_data(self, attack: str) -> str:
        return self.settings.training_data if attack == "benign" else self.settings.harmful_training_data

    def score_config(self, method: str, set_difference: bool = False):
        from safeneurons.scores.config import ScoreConfig

        s = self.settings
        extra = dict(utility_data=s.utility_data, q=s.setdiff_q or s.sparsity_ratio,
                     p=s.setdiff_p or s.sparsity_ratio) if set_difference else {}
        return ScoreConfig(method=method, data=s.prune_data, sparsity_ratio=s.sparsity_ratio, nsamples=s.nsamples,
                           seed=s.seed, max_length=s.max_length, data_dir=s.data_dir, batch_size=s.score_batch_size,
                           add_eos=s.add_eos, **extra)

    def score(self, model_name: str, method: str, set_difference: bool = False) -> Callable[[Path], None]:
        def work(folder: Path) -> None:
            from safeneurons.models.blocks import load_source
            from safeneurons.models.loading import ModelSource
            from safeneurons.scores.outputs import write_score_outputs
            from safeneurons.scores.schedules import score_model

            s = self.settings
            loaded = load_source(ModelSource(model_name, s.dtype, None, s.cache_dir, self.shard), self.device)
            result = score_model(loaded.model, loaded.tokenizer, self.score_config(method, set_difference))
            result.summary.update(model=model_name)
            write_score_outputs(result, folder, save_scores=False)

        return work

    def finetune(self, run: Run, rate: float | None = None, keep_model: bool = True) -> Callable[[Path], None]:
        """The fine-tuning of a run at its attack's rate (or `rate`); without `keep_model` the model is saved in
        the stage folder and removed once its report is written (the attack-strength trials)."""
        def work(folder: Path) -> None:
            from safeneurons.finetune.api import fine_tune
            from safeneurons.finetune.config import REPORT_FILE, FineTuneConfig
            from safeneurons.finetune.resume import run_settings
            from safeneurons.runtime.outputs import write_json

            s = self.settings
            deepspeed = s.deepspeed
            if deepspeed is None and distributed.world_size() > 1:
                deepspeed = str(write_json(folder / "ds_config.json", DEFAULT_ZERO3)) if distributed.is_main() else None
                deepspeed = distributed.broadcast_from_main(deepspeed)
            checkpoints = folder / "checkpoints"
            checkpointing = run.arm != "lisa"  # Lisa's proximal anchors live in memory: it cannot resume
            curve = dict(eval_every=s.eval_every, eval_prompts=s.harmful_data, eval_limit=s.curve_limit,
                         eval_max_new_tokens=s.curve_max_new_tokens) if s.eval_every else {}
            save_path = self.model_of(run) if keep_model else str(folder / "model")
            name = run.key if keep_model else folder.name  # a trial is tracked apart from the run it calibrates
            config = FineTuneConfig(data=self.attack_data(run.attack), save_path=save_path,
                                    num_epochs=s.num_epochs, learning_rate=rate or self.rates[run.attack],
                                    batch_size=s.batch_size, max_length=s.max_length, seed=run.seed, dtype=s.dtype,
                                    deepspeed=deepspeed, data_dir=s.data_dir, nsamples=s.finetune_nsamples,
                                    cache_dir=s.cache_dir, add_eos=s.add_eos,
                                    checkpoint_dir=str(checkpoints) if checkpointing else None,
                                    save_every=s.save_every if checkpointing else None,
                                    report_to=s.report_to, logging_dir=str(self.results / TRACKING_DIR / name),
                                    run_name=name, tracking_group=self.results.name,
                                    **curve, **arm_options(run.arm, s))
            mask_stage = ARM_MASK_STAGE[run.arm]
            masks = None if mask_stage is None else self.masks_of(mask_stage)
            config.resume = checkpointing and resumable(checkpoints, run_settings(config, masks))
            report = fine_tune(s.model, masks, config)
            if distributed.is_main():
                write_json(folder / REPORT_FILE, report.to_json())
                shutil.rmtree(checkpoints, ignore_errors=True)  # the model is saved: they have served
                if not keep_model:
                    shutil.rmtree(save_path, ignore_errors=True)

        return work

    def outputs_of(self, stage: str) -> Callable[[Path], list[Path]]:
        if stage.startswith("finetune_"):
            return lambda folder: [*model_files(self.models / stage[len("finetune_"):]), folder / "freeze_report.json"]
        if stage.startswith("defend_"):
            return lambda folder: [*model_files(self.models / stage[len("defend_"):]), folder / DEFENCE_FILE]
        if stage.startswith("calibrate_"):
            return lambda folder: [folder / "freeze_report.json"]
        if stage.startswith("eval_"):
            return lambda folder: [folder / "eval.json"]
        if stage == "compare":
            return lambda folder: [folder / "analysis_summary.json"]
        if stage == "direction":
            return lambda folder: [folder / "direction_report.json"]
        if stage == "circuit":
            return lambda folder: [folder / "circuit.json"]
        if stage == "neuron_patching":
            return lambda folder: [folder / "neuron_patching.json"]
        return lambda folder: [has_masks(folder)]

    def compare(self, folder: Path) -> None:
        from safeneurons.analysis.compare import compare_masks, weight_drift, write_comparison

        cache_dir = self.settings.cache_dir
        comparison = compare_masks(self.masks_of("score"), self.masks_of("rescore"), None,
                                   self.model_of(None), self.model_of(self.reference_run("safety_frozen")), cache_dir)
        drift = {arm: weight_drift(self.model_of(None), self.model_of(self.reference_run(arm)),
                                   self.masks_of(ARM_MASK_STAGE[arm] or "score"), cache_dir=cache_dir)
                 for arm in self.arms[1:]}
        if comparison is None:
            return
        metadata = {**run_metadata(self.settings), "arms_weight_drift": {arm: stats.to_json()
                                                                          for arm, stats in drift.items()}}
        write_comparison(comparison, folder, metadata)

    def evaluate(self, run: Run | None) -> Callable[[Path], None]:
        def work(folder: Path) -> None:
            from safeneurons.evaluation.evaluate import evaluate_model, load_judges
            from safeneurons.models.blocks import load_source
            from safeneurons.models.loading import ModelSource
            from safeneurons.runtime.outputs import write_json

            s, config = self.settings, self.eval_config()
            zero3 = self.zero3_config()
            held = ModelSource(self.model_of(run), s.dtype, None if self.shard == "layers" else zero3, s.cache_dir,
                               self.shard)
            loaded = load_source(held, self.device)
            judges = load_judges(config, s.dtype, zero3, s.cache_dir, self.device)
            report = evaluate_model(loaded.model, loaded.tokenizer, config, self.model_of(run), judges)
            if report is not None:
                write_json(folder / "eval.json", report.to_json())

        return work

    def eval_config(self):
        from safeneurons.evaluation.evaluate import EvalConfig

        s = self.settings
        return EvalConfig(prompts=s.harmful_data, limit=s.eval_limit, harmless=s.harmless_data,
                          harmless_limit=s.eval_limit, perplexity_data=s.perplexity_data,
                          perplexity_samples=s.perplexity_samples, max_new_tokens=s.max_new_tokens,
                          batch_size=s.eval_batch_size, max_length=s.max_length, seed=s.seed + 1,
                          data_dir=s.data_dir, add_eos=s.add_eos,
                          judges=tuple(name.strip() for name in s.judge.split(",") if name.strip()),
                          judge_models=(s.judge_model,) if s.judge_model else ())

    def zero3_config(self) -> str | dict | None:
        """The fine-tuning's ZeRO-3 config, so that evaluation runs partitioned under the same launch (None when
        fine-tuning does not partition the model)."""
        from safeneurons.runtime.dsconfig import read_config, zero_stage

        if self.settings.deepspeed is not None:
            return self.settings.deepspeed if zero_stage(read_config(self.settings.deepspeed)) == 3 else None
        return DEFAULT_ZERO3 if distributed.world_size() > 1 else None

    def scoring_fingerprint(self) -> dict:
        s = asdict(self.settings)
        return {key: s[key] for key in ("model", "prune_method", "prune_data", "sparsity_ratio", "nsamples",
                                        "max_length", "seed", "dtype", "data_dir", "add_eos")}

    def setdiff_fingerprint(self) -> dict:
        s = asdict(self.settings)
        return {**self.scoring_fingerprint(), **{key: s[key] for key in ("utility_data", "setdiff_q", "setdiff_p")}}

    def fingerprint(self, run: Run, rate: float | None = None) -> dict:
        """The settings that decide a run's model (fine-tuned at its attack's rate, or `rate`; or repaired)."""
        s = asdict(self.settings)
        if run.arm in POST_HOC_SOURCE:
            antidote = {"antidote_modules": list(AUTHORS_MODULES), **{key: s[key] for key in (
                "harmful_training_data", "score_batch_size")}}
            repair = {"base_model": s["base_model"], **(antidote if run.arm == "antidote" else {})}
            return {**self.fingerprint(source_run(run)), "defence": run.arm, **repair}
        training = {key: s[key] for key in ("num_epochs", "batch_size", "finetune_nsamples", "deepspeed",
                                            "save_path", "eval_every", "curve_limit", "curve_max_new_tokens",
                                            "harmful_data")}
        return {**self.scoring_fingerprint(), **training, "learning_rate": rate or self.rates[run.attack],
                "data": self.attack_data(run.attack), "arm": run.arm, "run_seed": run.seed,
                **(self.setdiff_fingerprint() if run.arm == "setdiff_frozen" else {}),
                **({"safety_layers": asdict(safety_layers_config(self.settings))} if run.arm == "sppft" else {}),
                **arm_options(run.arm, self.settings)}


def resumable(checkpoints: Path, settings: dict) -> bool:
    """Whether an interrupted fine-tuning stage left a checkpoint of this very run (collective): resume from it.
    A checkpoint of other settings is removed."""
    from safeneurons.finetune.resume import check_resume

    usable = None
    if distributed.is_main() and checkpoints.is_dir():
        try:
            check_resume(checkpoints, settings, ())
            usable = True
        except SafeneuronsError as why:
            log.warning("old checkpoints in %s are not this run's (%s): starting afresh", checkpoints, why)
            shutil.rmtree(checkpoints, ignore_errors=True)
    usable = distributed.broadcast_from_main(bool(usable))
    if usable:
        log.info("resuming the interrupted fine-tuning from %s", checkpoints)
    return usable


def run_metadata(settings: PipelineConfig) -> dict:
    """The original extension's run keys of analysis_summary.json."""
    return {"prune_method": settings.prune_method, "prune_data": settings.prune_data,
            "sparsity_ratio": settings.sparsity_ratio, "training_data": settings.training_data,
            "num_epochs": settings.num_epochs, "learning_rate": settings.learning_rate}


def inference_shard(settings: PipelineConfig, device: torch.device) -> str:
    """Collective: how the inference stages hold the model — `--shard`, or for auto layer-sharded when there
    are several ranks and the model does not fit one (models.blocks.needs_layer_sharding)."""
    from safeneurons.models.blocks import needs_layer_sharding

    if settings.shard != "auto":
        return settings.shard
    if distributed.world_size() == 1:
        return "none"
    reason = needs_layer_sharding(settings.model, settings.dtype, device, settings.cache_dir)
    if reason:
        log.info("--shard auto: the inference stages hold one block of layers per rank: %s %s", settings.model,
                 reason)
    return "layers" if reason else "none"
