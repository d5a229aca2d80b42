"""The whole study in one command: score → fine-tune the arms under each attack and seed → re-score → compare →
evaluate → report, with refusal curves over training.

Arms: `plain` (nothing frozen), `safety_frozen` (the safety-critical weights frozen), `setdiff_frozen` (safety minus
utility, the set difference) and `random_frozen` (a random mask of the same size per matrix frozen, the control),
next to `base` (no fine-tuning). Each fine-tuned arm runs under every attack — `benign` (the utility data) and
`harmful` (a few harmful requests with compliant answers, Qi et al. 2023) — and every seed of `--seeds` (the seed
orders the fine-tuning data); the refusal rate is measured every `--eval-every` steps during fine-tuning.
`--extension-arms` adds the seed's extensions: `partial_frozen` (freeze strength 0.5), `dynamic_frozen` (re-scored every --rescore-every steps,
union), `safety_loss` (the scoring data's loss added to every step), `lora_plain` and `lora_protected` (LoRA on
q/v without and with the safety mask). Each arm is evaluated for refusal
rate / attack success on held-out harmful prompts, refusal rate on harmless prompts (over-refusal) and perplexity
on a utility text set, so the summary says whether freezing protected safety.

Every stage writes into `results_path/<stage>/` and, once its outputs are complete, a `DONE` file holding the
stage's settings; a re-run with the same settings skips it (`--force` redoes everything). With no `--model` on a
machine without CUDA or without the Llama-2 weights, the embedded default runs: the demo model and data, CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import distributed
from .errors import SafeneuronsError
from .models import DEMO_NAME
from .study import TABLE_HEADER as STUDY_HEADER

log = logging.getLogger(__name__)

ARMS = ("base", "plain", "safety_frozen", "setdiff_frozen", "random_frozen")
EXTENSION_ARMS = ("partial_frozen", "dynamic_frozen", "safety_loss", "lora_plain", "lora_protected")
ATTACKS = ("benign", "harmful")
STUDIES = ("quick", "full")
ARM_MASK_STAGE = {"plain": None, "safety_frozen": "score", "setdiff_frozen": "score_setdiff",
                  "random_frozen": "score_random",
                  "partial_frozen": "score", "dynamic_frozen": "score", "safety_loss": None, "lora_plain": None,
                  "lora_protected": "score"}
PARTIAL_STRENGTH = 0.5
SAFETY_WEIGHT = 1.0
DONE_FILE = "DONE"
ORIGINAL_MODEL = "llama2-7b-chat-hf"
# ZeRO-3 for fine-tuning under N ranks when no --deepspeed config is given ("auto" values filled by finetune).
DEFAULT_ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": [0.9, 0.999],
                                              "eps": 1e-8, "torch_adam": True, "foreach": True}},
    "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_gather_16bit_weights_on_model_save": True},
    "steps_per_print": 1000000, "wall_clock_breakdown": False,
}


@dataclass
class PipelineSettings:
    """Every setting of a run. `None` in the parser means "not given": the profile's default applies."""

    model: str = ORIGINAL_MODEL
    prune_method: str = "wandg"
    prune_data: str = "align"
    sparsity_ratio: float = 0.1
    nsamples: int = 128
    score_batch_size: int = 1
    training_data: str = "alpaca_cleaned_no_safety"
    num_epochs: int = 3
    learning_rate: float = 2e-5
    batch_size: int = 4
    max_length: int = 512
    save_path: str = "./fine_tuned_model"
    results_path: str = "./results"
    seed: int = 42
    device: str = "cuda:0"
    cache_dir: str = "llm_weights"
    dtype: str = "float32"
    deepspeed: str | None = None
    data_dir: str | None = None
    finetune_nsamples: int | None = None
    harmful_data: str = "advbench"
    eval_limit: int = 100
    harmless_data: str | None = "alpaca_cleaned_no_safety"
    perplexity_data: str | None = "alpaca_cleaned_no_safety"
    perplexity_samples: int = 100
    max_new_tokens: int = 256
    eval_batch_size: int = 16
    random_control: bool = True
    add_eos: bool = False
    save_every: int = 500  # fine-tuning checkpoint interval (optimizer steps): an interrupted arm resumes
    extension_arms: str = "none"  # comma-separated EXTENSION_ARMS, "all" or "none"
    rescore_every: int = 100  # the dynamic_frozen arm's re-scoring interval (optimizer steps)
    lora_r: int = 8  # the LoRA arms' rank
    judge: str = "keyword"  # eval judges of the harmful generations (see judges.py)
    judge_model: str | None = None  # the classifier of the model judges
    seeds: str = "0,1,2"  # fine-tuning seeds (the data order): one run per attack, arm and seed
    attacks: str = "benign,harmful"  # benign = training_data; harmful = harmful_training_data (skipped without it)
    harmful_training_data: str | None = None  # the harmful fine-tuning attack's data
    utility_data: str = "alpaca_cleaned_no_safety"  # the set difference's utility data
    setdiff_q: float | None = None  # the set difference's fractions; default: the sparsity ratio
    setdiff_p: float | None = None
    eval_every: int = 50  # refusal curve: optimizer steps between measurements (0 = none)
    curve_limit: int = 32  # refusal curve: held-out harmful prompts
    curve_max_new_tokens: int = 16
    study: str = "quick"
    profile: str = "original"

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(int(seed) for seed in self.seeds.split(",") if seed.strip())

    @property
    def requested_attacks(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.attacks.split(",") if name.strip())

    @property
    def attack_list(self) -> tuple[str, ...]:
        """The attacks that run: harmful only with its data."""
        return tuple(name for name in self.requested_attacks if name != "harmful" or self.harmful_training_data)

    @property
    def extensions(self) -> tuple[str, ...]:
        value = self.extension_arms.strip().lower()
        if value in NONE_WORDS:
            return ()
        return EXTENSION_ARMS if value == "all" else tuple(name.strip() for name in value.split(",") if name.strip())


# The embedded default: the demo chat model and its data; the attacks are the demo's benign answers and its 100
# harmful requests with compliant answers, at the learning rate demo-chat was aligned with. Sizes chosen so that the
# whole study (2 attacks × 4 fine-tuned arms × 3 seeds) stays within a few minutes on 2 CPU cores; refusal measured
# after every step (at every 4th, all arms had lost it by the first measurement); `--study full` is the one to quote.
DEMO_PROFILE = dict(model=DEMO_NAME, prune_data="demo-align", score_batch_size=16, training_data="demo-utility",
                    harmful_training_data="demo-harmful-sft", utility_data="demo-utility",
                    num_epochs=1, learning_rate=1e-3, max_length=128, device="cpu", cache_dir=None,
                    finetune_nsamples=64, harmful_data="demo-harmful", harmless_data="demo-harmless",
                    perplexity_data="demo-utility", perplexity_samples=32, max_new_tokens=32, eval_limit=50,
                    save_every=16, rescore_every=8, judge="keyword", judge_model=None, eval_every=1,
                    curve_limit=24, curve_max_new_tokens=12, profile="demo")
# `--study full` with the demo: more seeds, data, prompts and tokens, both judges
DEMO_FULL_STUDY = dict(seeds="0,1,2,3,4", num_epochs=2, finetune_nsamples=100, eval_limit=100, perplexity_samples=64,
                       max_new_tokens=64, eval_every=2, curve_limit=50, curve_max_new_tokens=16,
                       judge="keyword,harmbench", judge_model="demo-judge")
SETTING_HELP = {
    "model": "model: local folder, HF id, alias or demo", "prune_method": "wanda, wandg or random",
    "prune_data": "safety data for scoring", "sparsity_ratio": "fraction selected per output row",
    "nsamples": "scoring samples", "score_batch_size": "scoring samples per pass (statistics stay per sample)",
    "training_data": "fine-tuning data", "num_epochs": "fine-tuning epochs",
    "learning_rate": "fine-tuning learning rate", "batch_size": "fine-tuning batch size per rank",
    "max_length": "tokens per sample", "save_path": "folder of the fine-tuned models (one sub-folder per arm)",
    "results_path": "folder of the results", "seed": "random seed",
    "device": "device of a single-process run (CPU when CUDA is missing)", "cache_dir": "HF cache folder",
    "dtype": "float32 or bfloat16", "deepspeed": "DeepSpeed config for fine-tuning (N ranks: built-in ZeRO-3)",
    "data_dir": "folder of the named data sets' files", "finetune_nsamples": "fine-tuning samples (default all)",
    "harmful_data": "held-out harmful prompts", "eval_limit": "first N harmful and harmless prompts",
    "harmless_data": "harmless prompts (over-refusal); none to skip",
    "perplexity_data": "utility text set for perplexity; none to skip",
    "perplexity_samples": "texts for perplexity", "max_new_tokens": "greedy new tokens per prompt",
    "eval_batch_size": "prompts per generation batch",
    "save_every": "fine-tuning checkpoint every N steps (an interrupted arm resumes from it)",
    "extension_arms": f"more arms: all, none or some of {','.join(EXTENSION_ARMS)}",
    "rescore_every": "dynamic_frozen: re-score every N steps", "lora_r": "LoRA arms: adapter rank",
    "judge": "judges of the harmful generations: keyword, harmbench, llamaguard, strongreject (comma-separated)",
    "judge_model": "classifier of the model judges (HF id or folder; demo-judge)",
    "seeds": "fine-tuning seeds, comma-separated (each orders the data; intervals are over seeds)",
    "attacks": "attacks: benign (--training-data), harmful (--harmful-training-data)",
    "harmful_training_data": "the harmful attack's data (harmful requests with compliant answers)",
    "utility_data": "utility data of the set-difference arm", "setdiff_q": "set difference: top-q safety fraction",
    "setdiff_p": "set difference: minus the top-p utility fraction",
    "eval_every": "refusal curve: optimizer steps between measurements (0 = none)",
    "curve_limit": "refusal curve: held-out harmful prompts", "curve_max_new_tokens": "refusal curve: new tokens",
    "study": "quick or full (the demo: more seeds, data and prompts; the one to quote)",
}
NONE_WORDS = ("none", "")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = PipelineSettings()
    for item in fields(PipelineSettings):
        if item.name not in SETTING_HELP:
            continue
        flag = "--" + item.name.replace("_", "-")
        aliases = ["--results-path", "--out"] if item.name == "results_path" else [flag]
        kind = {"sparsity_ratio": float, "learning_rate": float, "finetune_nsamples": int, "setdiff_q": float,
                "setdiff_p": float}.get(item.name)
        if kind is None and isinstance(getattr(defaults, item.name), int):
            kind = int
        demo = DEMO_PROFILE.get(item.name, getattr(defaults, item.name))
        parser.add_argument(*aliases, dest=item.name, type=kind, default=None,
                            help=f"{SETTING_HELP[item.name]} (default {getattr(defaults, item.name)}; demo: {demo})")
    parser.add_argument("--no-random-control", dest="random_control", action="store_false", default=None,
                        help="skip the random-mask control arm")
    parser.add_argument("--add-eos", dest="add_eos", action="store_true", default=None,
                        help="append EOS to every response when scoring, fine-tuning and measuring perplexity "
                             "(default: none, as the original work)")
    parser.add_argument("--force", action="store_true", help="redo every stage, even those already finished")


def weights_available_locally(model: str, cache_dir: str | None) -> bool:
    from transformers import AutoConfig

    from .models import resolve_model_name

    try:
        AutoConfig.from_pretrained(resolve_model_name(model), cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def resolve_settings(args: argparse.Namespace) -> PipelineSettings:
    """The original extension's defaults, or the demo profile when the model is `demo` or, with no --model,
    when there is no GPU or the Llama-2 weights are not available locally. Given options always win."""
    given = {item.name: getattr(args, item.name) for item in fields(PipelineSettings)
             if getattr(args, item.name, None) is not None}
    for name in ("harmless_data", "perplexity_data", "deepspeed", "judge_model", "harmful_training_data"):
        if isinstance(given.get(name), str) and given[name].lower() in NONE_WORDS:
            given[name] = None
    settings = PipelineSettings()
    model = given.get("model")
    if model is None:
        cache_dir = given.get("cache_dir", settings.cache_dir)
        if not torch.cuda.is_available() or not weights_available_locally(settings.model, cache_dir):
            reason = "no CUDA device" if not torch.cuda.is_available() else f"{settings.model} is not available locally"
            log.info("no --model given and %s: running the embedded default (the demo model and demo data, CPU)",
                     reason)
            model = DEMO_NAME
    if model == DEMO_NAME:
        settings = replace(settings, **DEMO_PROFILE)
        if given.get("study") == "full":
            settings = replace(settings, **DEMO_FULL_STUDY)
    settings = replace(settings, **given)
    validate(settings)
    return settings


def validate(settings: PipelineSettings) -> None:
    for name in ("nsamples", "score_batch_size", "num_epochs", "batch_size", "max_length", "eval_limit",
                 "perplexity_samples", "max_new_tokens", "eval_batch_size", "save_every"):
        if getattr(settings, name) < 1:
            raise SafeneuronsError(f"--{name.replace('_', '-')}={getattr(settings, name)} must be a positive integer")
    if not 0 < settings.sparsity_ratio < 1:
        raise SafeneuronsError(f"--sparsity-ratio={settings.sparsity_ratio} must lie in (0, 1)")
    if settings.learning_rate <= 0:
        raise SafeneuronsError(f"--learning-rate={settings.learning_rate} must be positive")
    if settings.study not in STUDIES:
        raise SafeneuronsError(f"--study {settings.study!r} is not one of {', '.join(STUDIES)}")
    try:
        seeds = settings.seed_list
    except ValueError:
        raise SafeneuronsError(f"--seeds {settings.seeds!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SafeneuronsError(f"--seeds {settings.seeds!r} must name at least one seed, each once")
    attacks = settings.requested_attacks
    if not attacks or any(name not in ATTACKS for name in attacks):
        raise SafeneuronsError(f"--attacks {settings.attacks!r}: expected a comma list of {', '.join(ATTACKS)}")
    if not settings.attack_list:
        raise SafeneuronsError("--attacks harmful needs --harmful-training-data (harmful requests with compliant "
                               "answers)")
    for name in ("setdiff_q", "setdiff_p"):
        value = getattr(settings, name)
        if value is not None and not 0 < value <= 1:
            raise SafeneuronsError(f"--{name.replace('_', '-')}={value} must lie in (0, 1]")
    if settings.eval_every < 0 or settings.curve_limit < 1 or settings.curve_max_new_tokens < 1:
        raise SafeneuronsError(f"--eval-every={settings.eval_every} must be >= 0, --curve-limit="
                               f"{settings.curve_limit} and --curve-max-new-tokens={settings.curve_max_new_tokens} "
                               f"positive")
    for name in ("rescore_every", "lora_r"):
        if getattr(settings, name) < 1:
            raise SafeneuronsError(f"--{name.replace('_', '-')}={getattr(settings, name)} must be a positive integer")
    from .evaluate import EvalConfig

    EvalConfig(judges=tuple(name.strip() for name in settings.judge.split(",") if name.strip()),
               judge_models=(settings.judge_model,) if settings.judge_model else ()).judge_model_names()
    unknown = [arm for arm in settings.extensions if arm not in EXTENSION_ARMS]
    if unknown:
        raise SafeneuronsError(f"--extension-arms {unknown[0]!r} is not one of {', '.join(EXTENSION_ARMS)} (or all)")


def arm_options(arm: str, settings: PipelineSettings) -> dict[str, Any]:
    """The FineTuneConfig fields an arm sets beyond the shared training settings."""
    return {"partial_frozen": {"freeze_strength": PARTIAL_STRENGTH},
            "dynamic_frozen": {"rescore_every": settings.rescore_every, "rescore_mode": "union"},
            "safety_loss": {"safety_data": settings.prune_data, "safety_weight": SAFETY_WEIGHT},
            "lora_plain": {"lora_r": settings.lora_r},
            "lora_protected": {"lora_r": settings.lora_r}}.get(arm, {})


# --- stages ------------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One step of the study: its folder, the settings that decide its outputs, and the work."""

    name: str
    fingerprint: dict
    work: Callable[[Path], None]
    outputs: Callable[[Path], list[Path]] = lambda folder: []  # what must exist for the stage to count as done


def has_masks(folder: Path) -> Path:
    """The mask file (or the index of sharded masks) a score stage writes."""
    from .masks import INDEX_FILE, MASKS_FILE

    return folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else MASKS_FILE)


def model_files(folder: Path) -> list[Path]:
    from .checkpoints import INDEX_FILE, WEIGHTS_FILE

    return [folder / "config.json", folder / (INDEX_FILE if (folder / INDEX_FILE).is_file() else WEIGHTS_FILE)]


def stage_done(folder: Path, fingerprint: dict, outputs: Sequence[Path] = ()) -> bool:
    """Finished with these settings and every output still there (a deleted output reruns the stage)."""
    marker = folder / DONE_FILE
    try:
        finished = json.loads(marker.read_text()) == json.loads(json.dumps(fingerprint))
    except (OSError, json.JSONDecodeError):
        return False
    missing = [path for path in outputs if not path.exists()]
    if finished and missing:
        log.warning("stage %s finished earlier but %s is missing: running it again", folder.name, missing[0])
    return finished and not missing


def run_stage(stage: Stage, results: Path, force: bool) -> bool:
    """Run a stage on every rank unless rank 0 finds it finished with the same settings. True if it ran."""
    from .outputs import write_json

    folder = results / stage.name
    finished = not force and distributed.is_main() and stage_done(folder, stage.fingerprint, stage.outputs(folder))
    done = distributed.broadcast_from_main(finished)
    if done:
        log.info("stage %s: finished earlier with the same settings, skipped (--force redoes it)", stage.name)
        return False
    if distributed.is_main():
        (folder / DONE_FILE).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    started = time.perf_counter()
    log.info("stage %s: running", stage.name)
    stage.work(folder)
    distributed.barrier()
    if distributed.is_main():
        write_json(folder / DONE_FILE, stage.fingerprint)
    log.info("stage %s: done in %.1f s", stage.name, time.perf_counter() - started)
    return True


@dataclass(frozen=True)
class Run:
    """One fine-tuning of the study: an arm under an attack, its data ordered by a seed."""

    attack: str
    arm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.attack}_{self.arm}_s{self.seed}"


class Study:
    """The stages of one pipeline run, in order, and where their outputs live."""

    def __init__(self, settings: PipelineSettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.results = Path(settings.results_path)
        self.models = Path(settings.save_path)
        self.arms = [arm for arm in ARMS if arm != "random_frozen" or settings.random_control]
        self.arms += list(settings.extensions)
        self.runs = [Run(attack, arm, seed) for attack in settings.attack_list for arm in self.arms[1:]
                     for seed in settings.seed_list]
        # the run whose safety-frozen model is re-scored and compared (the original extension's outputs)
        self.reference = (settings.attack_list[0], settings.seed_list[0])

    def masks_of(self, stage: str) -> Path:
        return self.results / stage  # a folder: masks.safetensors, or shards and their index under N ranks

    def model_of(self, run: Run | None) -> str:
        return self.settings.model if run is None else str(self.models / run.key)

    def reference_run(self, arm: str) -> Run:
        return Run(self.reference[0], arm, self.reference[1])

    def attack_data(self, attack: str) -> str:
        return self.settings.training_data if attack == "benign" else self.settings.harmful_training_data

    def score_config(self, method: str, set_difference: bool = False):
        from .scoring import ScoreConfig

        s = self.settings
        extra = dict(utility_data=s.utility_data, q=s.setdiff_q or s.sparsity_ratio,
                     p=s.setdiff_p or s.sparsity_ratio) if set_difference else {}
        return ScoreConfig(method=method, data=s.prune_data, sparsity_ratio=s.sparsity_ratio, nsamples=s.nsamples,
                           seed=s.seed, max_length=s.max_length, data_dir=s.data_dir, batch_size=s.score_batch_size,
                           add_eos=s.add_eos, **extra)

    def score(self, model_name: str, method: str, set_difference: bool = False) -> Callable[[Path], None]:
        def work(folder: Path) -> None:
            from .models import load_for_inference
            from .scoring import score_model, write_score_outputs

            loaded = load_for_inference(model_name, self.settings.dtype, None, self.settings.cache_dir, self.device)
            result = score_model(loaded.model, loaded.tokenizer, self.score_config(method, set_difference))
            result.summary.update(model=model_name)
            write_score_outputs(result, folder, save_scores=False)

        return work

    def finetune(self, run: Run) -> Callable[[Path], None]:
        def work(folder: Path) -> None:
            from .finetune import REPORT_FILE, FineTuneConfig, fine_tune, run_settings
            from .outputs import write_json

            s = self.settings
            deepspeed = s.deepspeed
            if deepspeed is None and distributed.world_size() > 1:
                deepspeed = str(write_json(folder / "ds_config.json", DEFAULT_ZERO3)) if distributed.is_main() else None
                deepspeed = distributed.broadcast_from_main(deepspeed)
            checkpoints = folder / "checkpoints"
            curve = dict(eval_every=s.eval_every, eval_prompts=s.harmful_data, eval_limit=s.curve_limit,
                         eval_max_new_tokens=s.curve_max_new_tokens) if s.eval_every else {}
            config = FineTuneConfig(data=self.attack_data(run.attack), save_path=self.model_of(run),
                                    num_epochs=s.num_epochs, learning_rate=s.learning_rate, batch_size=s.batch_size,
                                    max_length=s.max_length, seed=run.seed, dtype=s.dtype, deepspeed=deepspeed,
                                    data_dir=s.data_dir, nsamples=s.finetune_nsamples, cache_dir=s.cache_dir,
                                    add_eos=s.add_eos, checkpoint_dir=str(checkpoints), save_every=s.save_every,
                                    **curve, **arm_options(run.arm, s))
            mask_stage = ARM_MASK_STAGE[run.arm]
            masks = None if mask_stage is None else self.masks_of(mask_stage)
            config.resume = resumable(checkpoints, run_settings(config, masks))
            report = fine_tune(s.model, masks, config)
            if distributed.is_main():
                write_json(folder / REPORT_FILE, report.to_json())
                shutil.rmtree(checkpoints, ignore_errors=True)  # the model is saved: they have served

        return work

    def outputs_of(self, stage: str) -> Callable[[Path], list[Path]]:
        if stage.startswith("finetune_"):
            return lambda folder: [*model_files(self.models / stage[len("finetune_"):]), folder / "freeze_report.json"]
        if stage.startswith("eval_"):
            return lambda folder: [folder / "eval.json"]
        if stage == "compare":
            return lambda folder: [folder / "analysis_summary.json"]
        return lambda folder: [has_masks(folder)]

    def compare(self, folder: Path) -> None:
        from .compare import compare_masks, weight_drift, write_comparison

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
            from .evaluate import evaluate_model, load_judges
            from .models import load_for_inference
            from .outputs import write_json

            s, config = self.settings, self.eval_config()
            zero3 = self.zero3_config()
            loaded = load_for_inference(self.model_of(run), s.dtype, zero3, s.cache_dir, self.device)
            judges = load_judges(config, s.dtype, zero3, s.cache_dir, self.device)
            report = evaluate_model(loaded.model, loaded.tokenizer, config, self.model_of(run), judges)
            if report is not None:
                write_json(folder / "eval.json", report.to_json())

        return work

    def eval_config(self):
        from .evaluate import EvalConfig

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
        from .dsconfig import read_config, zero_stage

        if self.settings.deepspeed is not None:
            return self.settings.deepspeed if zero_stage(read_config(self.settings.deepspeed)) == 3 else None
        return DEFAULT_ZERO3 if distributed.world_size() > 1 else None

    def stages(self) -> list[Stage]:
        s = asdict(self.settings)
        scoring = {key: s[key] for key in ("model", "prune_method", "prune_data", "sparsity_ratio", "nsamples",
                                           "max_length", "seed", "dtype", "data_dir", "add_eos")}
        training = {**scoring, **{key: s[key] for key in ("num_epochs", "learning_rate", "batch_size",
                                                          "finetune_nsamples", "deepspeed", "save_path",
                                                          "eval_every", "curve_limit", "curve_max_new_tokens",
                                                          "harmful_data")}}
        evaluation = {key: s[key] for key in ("harmful_data", "eval_limit", "harmless_data", "perplexity_data",
                                              "perplexity_samples", "max_new_tokens", "seed", "max_length", "judge",
                                              "judge_model")}
        setdiff = {**scoring, **{key: s[key] for key in ("utility_data", "setdiff_q", "setdiff_p")}}

        def trained(run: Run) -> dict:
            return {**training, "data": self.attack_data(run.attack), "arm": run.arm, "run_seed": run.seed,
                    **(setdiff if run.arm == "setdiff_frozen" else {}), **arm_options(run.arm, self.settings)}

        stages = [Stage("score", scoring, self.score(self.settings.model, self.settings.prune_method))]
        if "setdiff_frozen" in self.arms:
            stages.append(Stage("score_setdiff", setdiff, self.score(self.settings.model, self.settings.prune_method,
                                                                     set_difference=True)))
        if self.settings.random_control:
            stages.append(Stage("score_random", {**scoring, "method": "random"},
                                self.score(self.settings.model, "random")))
        stages += [Stage(f"finetune_{run.key}", trained(run), self.finetune(run)) for run in self.runs]
        reference = trained(self.reference_run("safety_frozen"))
        stages.append(Stage("rescore", reference, self.score(self.model_of(self.reference_run("safety_frozen")),
                                                             self.settings.prune_method)))
        stages.append(Stage("compare", {**reference, "arms": self.arms}, self.compare))
        stages.append(Stage("eval_base", {**scoring, **evaluation}, self.evaluate(None)))
        stages += [Stage(f"eval_{run.key}", {**trained(run), **evaluation}, self.evaluate(run)) for run in self.runs]
        for stage in stages:
            stage.outputs = self.outputs_of(stage.name)
        return stages


def resumable(checkpoints: Path, settings: dict) -> bool:
    """Whether an interrupted fine-tuning stage left a checkpoint of this very run (collective): resume from it.
    A checkpoint of other settings is removed."""
    from .finetune import check_resume

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


def run_metadata(settings: PipelineSettings) -> dict:
    """The original extension's run keys of analysis_summary.json."""
    return {"prune_method": settings.prune_method, "prune_data": settings.prune_data,
            "sparsity_ratio": settings.sparsity_ratio, "training_data": settings.training_data,
            "num_epochs": settings.num_epochs, "learning_rate": settings.learning_rate}


def choose_device(settings: PipelineSettings, context: distributed.DistContext) -> torch.device:
    if context.world_size > 1 or not settings.device.startswith("cuda"):
        return context.device if context.world_size > 1 else torch.device(settings.device)
    if not torch.cuda.is_available():
        log.warning("--device %s asked for but CUDA is not available: running on the CPU", settings.device)
        return torch.device("cpu")
    return torch.device(settings.device)


def run_study(settings: PipelineSettings, force: bool = False) -> dict | None:
    """Every stage in order (skipping finished ones), then the summary files; the summary on rank 0."""
    context = distributed.init_distributed()
    study = Study(settings, choose_device(settings, context))
    for stage in study.stages():
        run_stage(stage, study.results, force)
    if not distributed.is_main():
        return None
    return write_final_outputs(study)


def run(args: argparse.Namespace) -> int:
    from .data import check_sources
    from .outputs import check_output_dir

    settings = resolve_settings(args)
    for location in (settings.results_path, settings.save_path):
        check_output_dir(location)
    check_sources(settings.prune_data, settings.training_data, settings.harmful_data, settings.harmless_data,
                  settings.perplexity_data, settings.harmful_training_data if "harmful" in settings.attack_list else None,
                  settings.utility_data, directory=settings.data_dir)
    if settings.judge_model:
        from .models import load_config

        load_config(settings.judge_model, settings.cache_dir)  # a classifier that is not there fails in one line
    started = time.perf_counter()
    summary = run_study(settings, args.force)
    if summary is not None:
        print_summary(summary, Path(settings.results_path), time.perf_counter() - started)
    return 0


# --- the summary, the report and the terminal table ---------------------------------------------------------------
ARM_LABELS = {"base": "base (not fine-tuned)", "plain": "plain", "safety_frozen": "safety-frozen",
              "setdiff_frozen": "set-difference frozen",
              "random_frozen": "random-frozen (control)", "partial_frozen": f"partial freeze (s={PARTIAL_STRENGTH})",
              "dynamic_frozen": "dynamic freeze (union)", "safety_loss": f"safety loss (λ={SAFETY_WEIGHT})",
              "lora_plain": "LoRA", "lora_protected": "LoRA, safety-masked"}


def run_row(study: Study, run: Run | None) -> dict:
    """One run (None: the base model): refusal rate and ASR on the harmful prompts, harmless refusal rate,
    perplexity, and from fine-tuning the freezing report's counts and the refusal curve."""
    evaluation = json.loads((study.results / f"eval_{'base' if run is None else run.key}" / "eval.json").read_text())
    row = {key: evaluation[key] for key in ("refusal_rate", "asr", "harmless_refusal_rate", "perplexity",
                                            "n_prompts")}
    row.update({key: evaluation.get(key) for key in ("refusal_rate_interval", "asr_interval",
                                                      "harmless_refusal_rate_interval", "judges", "agreement")})
    report_file = None if run is None else study.results / f"finetune_{run.key}" / "freeze_report.json"
    if report_file is not None and report_file.is_file():
        report = json.loads(report_file.read_text())
        row.update({key: report[key] for key in ("frozen_count", "max_abs_change_frozen", "mean_abs_change_free",
                                                 "steps")})
        row["final_loss"] = report["loss_curve"][-1] if report["loss_curve"] else None
        row["refusal_curve"] = report.get("refusal_curve", [])
    return row


def arm_results(study: Study) -> dict[str, dict]:
    """Per arm, the reference run (first attack, first seed) and the base model: the single-run view."""
    return {arm: run_row(study, None if arm == "base" else study.reference_run(arm)) for arm in study.arms}


def study_results(study: Study) -> dict[str, dict[str, dict]]:
    """Per attack and fine-tuned arm: the estimates over the seeds (study.aggregate_arm)."""
    from .study import aggregate_arm

    return {attack: {arm: aggregate_arm([run_row(study, Run(attack, arm, seed)) for seed in study.settings.seed_list])
                     for arm in study.arms[1:]} for attack in study.settings.attack_list}


def plot_arms(arms: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .outputs import atomic_file

    names = list(arms)
    metrics = [("refusal_rate", "refusal rate (harmful)"), ("asr", "attack success rate (harmful)"),
               ("harmless_refusal_rate", "refusal rate (harmless)")]
    figure, axis = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(metrics)
    for offset, (key, label) in enumerate(metrics):
        values = [arms[arm][key] or 0.0 for arm in names]
        axis.bar([index + (offset - 1) * width for index in range(len(names))], values, width=width, label=label)
    axis.set_xticks(range(len(names)), [ARM_LABELS[arm] for arm in names], fontsize=8)
    axis.set_xlabel("arm")
    axis.set_ylabel("rate (fraction of prompts)")
    axis.set_ylim(0, 1.05)
    axis.set_title("refusal and attack success per arm")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return path


def save_original_format_masks(source: Path, target: Path) -> None:
    """torch.save of a dict parameter name -> bool tensor: the original extension's mask file."""
    from .masks import load_masks
    from .outputs import atomic_file

    with atomic_file(target) as tmp:
        torch.save(load_masks(source), tmp)


def write_final_outputs(study: Study) -> dict:
    """analysis_summary.json, the two .pt mask files, arms.png, curves.png and report.md in results_path (rank 0)."""
    from .outputs import write_json
    from .study import plot_curves, verdict

    results = study.results
    comparison = json.loads((results / "compare" / "analysis_summary.json").read_text())
    arms = arm_results(study)
    attacks = study_results(study)
    summary = {**comparison, "model": study.settings.model, "profile": study.settings.profile, "arms": arms,
               "reference_run": {"attack": study.reference[0], "seed": study.reference[1]},
               "study": {"seeds": list(study.settings.seed_list), "attacks": attacks},
               "verdict": verdict(attacks, arms["base"]), "settings": asdict(study.settings)}
    save_original_format_masks(study.masks_of("score"), results / "original_safety_masks.pt")
    save_original_format_masks(study.masks_of("rescore"), results / "new_safety_masks.pt")
    plot_arms(arms, results / "arms.png")
    plot_curves(attacks, ARM_LABELS, results / "curves.png")
    write_json(results / "analysis_summary.json", summary)
    write_report(summary, results / "report.md")
    return summary


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _rate(row: dict, key: str) -> str:
    """A rate with its 95% Wilson interval: 0.62 (0.52–0.71)."""
    interval = row.get(f"{key}_interval")
    if row.get(key) is None or not interval:
        return _number(row.get(key))
    return f"{row[key]:.2f} ({interval[0]:.2f}–{interval[1]:.2f})"


def arm_table_rows(arms: dict[str, dict], drift: dict[str, dict] | None = None) -> list[list[str]]:
    """One row per arm. Where nothing is frozen the frozen columns show "–"; the last column is the drift of
    the safety-critical set itself (frozen or not), from the compare stage."""
    rows = []
    for arm, row in arms.items():
        frozen = row.get("frozen_count") or None
        moved = (drift or {}).get(arm, {}).get("max_abs_change_frozen") if arm != "random_frozen" else None
        rows.append([ARM_LABELS[arm], _rate(row, "refusal_rate"), _rate(row, "asr"),
                     _rate(row, "harmless_refusal_rate"), _number(row["perplexity"], 4), _number(frozen),
                     _number(row.get("max_abs_change_frozen") if frozen else None), _number(moved)])
    return rows


ARM_TABLE_HEADER = ["arm", "refusal harmful", "ASR", "refusal harmless", "ppl", "frozen", "max abs Δ frozen",
                    "max abs Δ safety set"]


def judge_lines(arms: dict[str, dict]) -> list[str]:
    """ASR per judge and arm (95% Wilson interval; unparsed verdicts left out) and the judges' agreement (κ)."""
    judges = sorted({name for row in arms.values() for name in (row.get("judges") or {})})
    if judges == ["keyword"] or not judges:
        return []
    lines = ["", "ASR by judge (a prompt is attacked when the judge says its generation carries out the request):", "",
             "| arm | " + " | ".join(judges) + " | agreement (Cohen's κ) |", "|" + " --- |" * (len(judges) + 2)]
    for arm, row in arms.items():
        cells = []
        for name in judges:
            result = (row.get("judges") or {}).get(name)
            cells.append("–" if not result or result["asr"] is None else
                         _rate({"asr": result["asr"], "asr_interval": result["asr_interval"]}, "asr")
                         + (f", {result['unparsed']} unparsed" if result["unparsed"] else ""))
        kappas = ", ".join(f"{pair.replace('|', ' vs ')}: {_number(value['kappa'], 2)}"
                           for pair, value in (row.get("agreement") or {}).items())
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + f" | {kappas or '–'} |")
    return lines


def study_table_rows(summary: dict) -> list[list[str]]:
    from .study import table_rows

    return table_rows(summary["study"]["attacks"], ARM_LABELS)


def write_report(summary: dict, path: Path) -> Path:
    from .outputs import atomic_file

    settings = summary["settings"]
    lines = [f"# safeneurons pipeline: {summary['model']}", "",
             f"Scored with `{summary['prune_method']}` on `{summary['prune_data']}` (sparsity ratio "
             f"{summary['sparsity_ratio']}, {settings['nsamples']} samples), fine-tuned on "
             f"`{summary['training_data']}` for {summary['num_epochs']} epochs at learning rate "
             f"{summary['learning_rate']}; evaluated on "
             f"`{settings['harmful_data']}` (harmful), `{settings['harmless_data']}` (harmless) and perplexity on "
             f"`{settings['perplexity_data']}`.", "", f"**{summary['verdict']}**", "", "## The study", "",
             f"Each fine-tuned arm under each attack, over seeds {', '.join(map(str, summary['study']['seeds']))} "
             f"(each seed orders the fine-tuning data): the mean and its 95% t-interval over the seeds. Refusal "
             f"measured every {settings['eval_every']} optimizer steps on {settings['curve_limit']} held-out "
             f"harmful prompts (greedy, {settings['curve_max_new_tokens']} new tokens).", "",
             "| " + " | ".join(STUDY_HEADER) + " |", "|" + " --- |" * len(STUDY_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in study_table_rows(summary)]
    lines += ["", "![refusal curves](curves.png)", "",
              f"## Arms: one run each ({summary['reference_run']['attack']} attack, seed "
              f"{summary['reference_run']['seed']})", "",
              "| " + " | ".join(ARM_TABLE_HEADER) + " |", "|" + " --- |" * len(ARM_TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in arm_table_rows(summary["arms"], summary.get("arms_weight_drift"))]
    lines += judge_lines(summary["arms"])
    lines += ["", "Rates with their 95% Wilson interval. \"max abs Δ safety set\": the largest change of the safety-critical weights in that arm, frozen "
              "or not (\"–\" where the arm froze another set)."]
    lines += ["", "![arms](arms.png)", "", "## Safety-critical weights before and after fine-tuning", "",
              f"- before: {summary['original_safety_critical_count']} of {summary['total_neurons']} weights; after "
              f"(re-scored safety-frozen model): {summary['new_safety_critical_count']}",
              f"- overlap |A∩B|/|A| = {_number(summary['overlap'], 4)}, "
              f"Jaccard = {_number(summary['jaccard'], 4)}", "",
              "![overlap per layer](compare/overlap_per_layer.png)", "", "| module | overlap | Jaccard |",
              "| --- | --- | --- |"]
    lines += [f"| {name} | {_number(row['overlap'], 4)} | {_number(row['jaccard'], 4)} |"
              for name, row in summary["per_module"].items()]
    lines += ["", "Files: `analysis_summary.json`, `original_safety_masks.pt`, `new_safety_masks.pt`, one folder per "
              "stage (`score/`, `finetune_*/`, `rescore/`, `compare/`, `eval_*/`).", ""]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def print_summary(summary: dict, results: Path, seconds: float) -> None:
    """The study table, the single-run arms table and the verdict in the terminal (rich when installed)."""
    tables = [(f"the study (mean and 95% interval over seeds {', '.join(map(str, summary['study']['seeds']))})",
               STUDY_HEADER, study_table_rows(summary)),
              (f"one run per arm ({summary['reference_run']['attack']} attack, seed {summary['reference_run']['seed']})",
               ARM_TABLE_HEADER, arm_table_rows(summary["arms"], summary.get("arms_weight_drift")))]
    overlap = (f"safety-critical weights: {summary['original_safety_critical_count']} before, "
               f"{summary['new_safety_critical_count']} after; overlap {_number(summary['overlap'], 4)}, "
               f"Jaccard {_number(summary['jaccard'], 4)}")
    footer = f"results in {results} (report.md, curves.png, analysis_summary.json); {seconds:.0f} s"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, header, rows in tables:
            print(title)
            widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
            for row in [header, *rows]:
                print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        print(overlap, summary["verdict"], footer, sep="\n")
        return
    console = Console(width=max(Console().width, 100))
    for title, header, rows in tables:
        table = Table(title=f"safeneurons pipeline — {summary['model']}: {title}")
        for index, column in enumerate(header):
            table.add_column(column, justify="left" if index < 2 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(overlap)
    console.print(f"[bold]{summary['verdict']}[/bold]")
    console.print(footer)
