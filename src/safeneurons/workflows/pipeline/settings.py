"""The study's settings (PipelineConfig): the original extension's defaults, the demo profile, their validation."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from safeneurons.data.readers import check_sources
from safeneurons.errors import SafeneuronsError
from safeneurons.finetune.constrained import PAPER_BETAS
from safeneurons.models.loading import (DEMO_CHAT_NAME, DEMO_MOE_BASE_NAME, DEMO_MOE_CHAT_NAME, DEMO_MOE_NAME,
                                        DEMO_NAME, SHARD_MODES, load_config)
from safeneurons.runtime.outputs import check_output_dir
from safeneurons.runtime.tracking import TrackingConfig

if TYPE_CHECKING:
    from safeneurons.interp.neurons.study import NeuronStudyConfig

log = logging.getLogger(__name__)

ARMS = ("base", "plain", "safety_frozen", "setdiff_frozen", "random_frozen")
EXTENSION_ARMS = ("partial_frozen", "dynamic_frozen", "safety_loss", "lora_plain", "lora_protected")
# The field's defences (docs/defences.md): three train, three repair a fine-tuned arm's model afterwards
DEFENCES = ("sppft", "safe_lora", "lisa", "constrained_sft", "antidote", "resta")
POST_HOC_SOURCE = {"safe_lora": "lora_plain", "antidote": "plain", "resta": "plain"}  # the arm each one repairs
NEEDS_BASE_MODEL = ("safe_lora", "resta")
ATTACKS = ("benign", "harmful")
STUDIES = ("quick", "full")
ARM_MASK_STAGE = {"plain": None, "safety_frozen": "score", "setdiff_frozen": "score_setdiff",
                  "random_frozen": "score_random",
                  "partial_frozen": "score", "dynamic_frozen": "score", "safety_loss": None, "lora_plain": None,
                  "lora_protected": "score", "sppft": "safety_layers", "lisa": None, "constrained_sft": None,
                  "safe_lora": None, "antidote": None, "resta": None}
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
class PipelineConfig:
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
    report_to: str = "none"  # tracking of every fine-tune and of the study's results (runtime/tracking.py)
    direction: bool = False  # add the base model's refusal direction (workflows/pipeline/direction.py)
    circuit: bool = False  # add the aligned model's refusal circuit as edges (workflows/pipeline/circuit.py)
    neuron_patching: bool = False  # add the neuron study (workflows/pipeline/neurons.py)
    neuron_base_model: str | None = None  # its unaligned base of --model (demo: demo-base)
    neuron_fractions: str = "0.005,0.01,0.02,0.05,0.1,0.2"  # its k: fractions of each layer's MLP neurons
    neuron_random_seeds: str = "0,1,2"  # its random control's seeds
    defences: str = "none"  # comma-separated DEFENCES, "all" or "none": more arms (workflows/pipeline/defences.py)
    base_model: str | None = None  # the unaligned base of --model: Safe LoRA's and RESTA's other end (demo-base)
    lisa_steps: str = "paper"  # the lisa arm's alignment and fine-tuning steps per cycle: paper or A,F
    attack_rates: str = "none"  # candidate learning rates; the attack's is chosen from plain alone (calibration.py)
    attack_halving_fraction: float = 0.25  # the rule: plain's refusal must not halve before this fraction of steps
    shard: str = "auto"  # the inference stages' holding: none, layers (one block of layers per rank) or auto
    profile: str = "original"

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(int(seed) for seed in self.seeds.split(",") if seed.strip())

    @property
    def neuron_fraction_list(self) -> tuple[float, ...]:
        return tuple(float(k) for k in self.neuron_fractions.split(",") if k.strip())

    @property
    def neuron_seed_list(self) -> tuple[int, ...]:
        return tuple(int(seed) for seed in self.neuron_random_seeds.split(",") if seed.strip())

    @property
    def requested_attacks(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.attacks.split(",") if name.strip())

    @property
    def attack_list(self) -> tuple[str, ...]:
        """The attacks that run: harmful only with its data."""
        return tuple(name for name in self.requested_attacks if name != "harmful" or self.harmful_training_data)

    @property
    def extensions(self) -> tuple[str, ...]:
        return chosen_names(self.extension_arms, EXTENSION_ARMS)

    @property
    def defence_list(self) -> tuple[str, ...]:
        return chosen_names(self.defences, DEFENCES)

    @property
    def attack_rate_list(self) -> tuple[float, ...]:
        """The candidate rates, largest first (the rule takes the first that passes)."""
        if self.attack_rates.strip().lower() in NONE_WORDS:
            return ()
        return tuple(sorted((float(rate) for rate in self.attack_rates.split(",") if rate.strip()), reverse=True))

    @property
    def lisa_step_pair(self) -> tuple[int, int]:
        from safeneurons.finetune.lisa import PAPER_STEPS

        if self.lisa_steps == "paper":
            return PAPER_STEPS
        alignment, finetuning = (int(steps) for steps in self.lisa_steps.split(","))
        return alignment, finetuning


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
                    curve_limit=24, curve_max_new_tokens=12, neuron_base_model="demo-base", base_model="demo-base",
                    lisa_steps="1,9", attack_rates="1e-3,3e-4,1e-4,3e-5,1e-5", profile="demo")
# The mixture-of-experts demo pair: the same study on demo-moe, lineage and the neuron study against demo-moe-base
DEMO_MOE_PROFILE = {**DEMO_PROFILE, "model": DEMO_MOE_NAME, "neuron_base_model": DEMO_MOE_BASE_NAME,
                    "base_model": DEMO_MOE_BASE_NAME}
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
    "results_path": "folder of the results",
    "seed": "seed of the calibration samples (the extension's default; score and finetune default to the original "
            "work's 0)",
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
    "neuron_base_model": "--neuron-patching: the unaligned base of --model (same structure and tokenizer)",
    "neuron_fractions": "--neuron-patching: k, fractions of each layer's MLP neurons patched (comma-separated)",
    "neuron_random_seeds": "--neuron-patching: seeds of the random neurons, the control (comma-separated)",
    "defences": f"the field's defences as more arms: all, none or some of {','.join(DEFENCES)}",
    "base_model": "the unaligned base of --model (safe_lora, resta: the other end of the alignment/safety vector)",
    "lisa_steps": "lisa arm: alignment and fine-tuning steps per cycle, paper (100,900) or A,F",
    "attack_rates": "candidate learning rates (comma-separated) for the attack strength, chosen from the plain arm "
                    "alone before any other arm runs; none: --learning-rate",
    "attack_halving_fraction": "the rule: the largest candidate at which plain's refusal does not halve before "
                               "this fraction of the run's steps",
    "shard": "the inference stages (score, set difference, random, rescore, eval): none; layers: one block of "
             "decoder layers per rank, read from the safetensors, hidden states passed rank to rank; auto: layers "
             "when there are several ranks and the model's weights take more than half a rank's free memory",
    "report_to": "experiment tracking: tensorboard, wandb or none (RESULTS/runs: one run per fine-tune, one for the "
                 "study's results)",
}
NONE_WORDS = ("none", "")


def chosen_names(value: str, every: tuple[str, ...]) -> tuple[str, ...]:
    """A comma list of names, "all" (`every`) or "none"."""
    value = value.strip().lower()
    if value in NONE_WORDS:
        return ()
    return every if value == "all" else tuple(name.strip() for name in value.split(",") if name.strip())


def weights_available_locally(model: str, cache_dir: str | None) -> bool:
    from transformers import AutoConfig

    from safeneurons.models.loading import resolve_model_name

    try:
        AutoConfig.from_pretrained(resolve_model_name(model, cache_dir), cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError):
        return False
    return True


def validate(settings: PipelineConfig) -> None:
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
    from safeneurons.scores.config import METHODS

    if settings.prune_method not in METHODS:
        raise SafeneuronsError(f"--score-method {settings.prune_method!r} is not one of {', '.join(METHODS)}")
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
    if settings.shard not in (*SHARD_MODES, "auto"):
        raise SafeneuronsError(f"--shard {settings.shard!r} is not one of {', '.join(SHARD_MODES)}, auto")
    from safeneurons.evaluation.evaluate import EvalConfig

    EvalConfig(judges=tuple(name.strip() for name in settings.judge.split(",") if name.strip()),
               judge_models=(settings.judge_model,) if settings.judge_model else ()).judge_model_names()
    TrackingConfig(settings.report_to, settings.results_path).validate()
    validate_neuron_settings(settings)
    validate_defence_settings(settings)
    unknown = [arm for arm in settings.extensions if arm not in EXTENSION_ARMS]
    if unknown:
        raise SafeneuronsError(f"--extension-arms {unknown[0]!r} is not one of {', '.join(EXTENSION_ARMS)} (or all)")


def validate_neuron_settings(settings: PipelineConfig) -> None:
    if not settings.neuron_patching:
        return
    if not settings.neuron_base_model:
        raise SafeneuronsError(f"--neuron-patching needs --neuron-base-model: the unaligned base that --model "
                               f"{settings.model} was aligned from")
    for name, parse in (("neuron_fractions", lambda: settings.neuron_fraction_list),
                        ("neuron_random_seeds", lambda: settings.neuron_seed_list)):
        try:
            parse()
        except ValueError:
            raise SafeneuronsError(f"--{name.replace('_', '-')} {getattr(settings, name)!r} is not a comma-separated "
                                   f"list of numbers") from None
    neuron_study_config(settings).validate()


def validate_defence_settings(settings: PipelineConfig) -> None:
    """--defences, --lisa-steps and the attack-strength rule's settings (one line each, before anything loads)."""
    unknown = [name for name in settings.defence_list if name not in DEFENCES]
    if unknown:
        raise SafeneuronsError(f"--defences {unknown[0]!r} is not one of {', '.join(DEFENCES)} (or all, none)")
    needing = [name for name in settings.defence_list if name in NEEDS_BASE_MODEL]
    if needing and not settings.base_model:
        raise SafeneuronsError(f"--defences {needing[0]} needs --base-model: the unaligned base that --model "
                               f"{settings.model} was aligned from")
    try:
        steps = settings.lisa_step_pair
    except ValueError:
        steps = None
    if steps is None or steps[0] < 0 or steps[1] < 1:
        raise SafeneuronsError(f"--lisa-steps {settings.lisa_steps!r}: expected paper or A,F (alignment steps >= 0, "
                               f"fine-tuning steps >= 1 per cycle)")
    try:
        rates = settings.attack_rate_list
    except ValueError:
        rates = (0.0,)
    if any(rate <= 0 for rate in rates) or len(set(rates)) != len(rates):
        raise SafeneuronsError(f"--attack-rates {settings.attack_rates!r}: expected distinct positive learning rates, "
                               f"comma-separated, or none")
    if rates and settings.eval_every == 0:
        raise SafeneuronsError("--attack-rates chooses the rate from plain's refusal curve: --eval-every must be > 0")
    if not 0 < settings.attack_halving_fraction <= 1:
        raise SafeneuronsError(f"--attack-halving-fraction={settings.attack_halving_fraction} must lie in (0, 1]")


def arm_options(arm: str, settings: PipelineConfig) -> dict[str, Any]:
    """The FineTuneConfig fields an arm sets beyond the shared training settings."""
    return {"partial_frozen": {"freeze_strength": PARTIAL_STRENGTH},
            "dynamic_frozen": {"rescore_every": settings.rescore_every, "rescore_mode": "union"},
            "safety_loss": {"safety_data": settings.prune_data, "safety_weight": SAFETY_WEIGHT},
            "lora_plain": {"lora_r": settings.lora_r},
            "lora_protected": {"lora_r": settings.lora_r},
            "lisa": {"safety_data": settings.prune_data, "lisa_steps": settings.lisa_step_pair},
            "constrained_sft": {"constrained_betas": PAPER_BETAS}}.get(arm, {})


def resolve_config(given: dict[str, Any]) -> PipelineConfig:
    """The original extension's defaults, or the demo profile when the model is `demo` or, with no model given,
    when there is no GPU or the Llama-2 weights are not available locally. Given settings always win ("none"
    switches an optional data set or config off)."""
    given = dict(given)
    for name in ("harmless_data", "perplexity_data", "deepspeed", "judge_model", "harmful_training_data",
                 "neuron_base_model", "base_model"):
        if isinstance(given.get(name), str) and given[name].lower() in NONE_WORDS:
            given[name] = None
    settings = PipelineConfig()
    model = given.get("model")
    if model is None:
        cache_dir = given.get("cache_dir", settings.cache_dir)
        if not torch.cuda.is_available() or not weights_available_locally(settings.model, cache_dir):
            reason = "no CUDA device" if not torch.cuda.is_available() else f"{settings.model} is not available locally"
            log.info("no --model given and %s: running the embedded default (the demo model and demo data, CPU)",
                     reason)
            model = DEMO_NAME
    profile = {DEMO_NAME: DEMO_PROFILE, DEMO_CHAT_NAME: DEMO_PROFILE, DEMO_MOE_NAME: DEMO_MOE_PROFILE,
               DEMO_MOE_CHAT_NAME: DEMO_MOE_PROFILE}.get(model)  # one model, two names
    if profile is not None:
        settings = replace(settings, **profile)
        if given.get("study") == "full":
            settings = replace(settings, **DEMO_FULL_STUDY)
    settings = replace(settings, **given)
    validate(settings)
    return settings


def neuron_study_config(s: PipelineConfig) -> NeuronStudyConfig:
    """The neuron study's config from the pipeline's settings (`--neuron-patching`)."""
    from safeneurons.interp.neurons.rankings import WEIGHT_METHODS
    from safeneurons.interp.neurons.study import NeuronStudyConfig

    return NeuronStudyConfig(prompts=s.harmful_data, limit=s.eval_limit, safety_data=s.prune_data,
                             utility_data=s.utility_data, nsamples=s.nsamples, setdiff_method=s.prune_method
                             if s.prune_method in WEIGHT_METHODS else "wandg",
                             setdiff_p=s.setdiff_p or s.sparsity_ratio, fractions=s.neuron_fraction_list,
                             random_seeds=s.neuron_seed_list, max_new_tokens=s.max_new_tokens,
                             batch_size=s.eval_batch_size, score_batch_size=s.score_batch_size,
                             max_length=s.max_length, seed=s.seed, data_dir=s.data_dir, add_eos=s.add_eos)


def check_neuron_inputs(s: PipelineConfig) -> None:
    """Before the study starts: the neuron study's base model's structure against the aligned model's (configs
    only)."""
    from safeneurons.models.loading import ModelSource

    neuron_study_config(s).check_inputs(ModelSource(s.model, s.dtype, None, s.cache_dir),
                                        ModelSource(s.neuron_base_model, s.dtype, None, s.cache_dir))


def check_inputs(settings: PipelineConfig) -> None:
    """A model that is not there, unwritable outputs, missing data sets and a judge model that is not there fail
    here, in one line, in that order."""
    load_config(settings.model, settings.cache_dir)
    for location in (settings.results_path, settings.save_path):
        check_output_dir(location)
    check_sources(settings.prune_data, settings.training_data, settings.harmful_data, settings.harmless_data,
                  settings.perplexity_data, settings.harmful_training_data if "harmful" in settings.attack_list else None,
                  settings.utility_data, directory=settings.data_dir)
    if settings.judge_model:
        load_config(settings.judge_model, settings.cache_dir)
    if settings.neuron_patching:
        check_neuron_inputs(settings)





def safety_layers_config(s: PipelineConfig):
    from safeneurons.interp.safety_layers import SafetyLayersConfig

    return SafetyLayersConfig(model=s.model, harmful_data=s.prune_data, harmless_data=s.utility_data, dtype=s.dtype,
                              data_dir=s.data_dir, cache_dir=s.cache_dir)


def defence_arms(settings: PipelineConfig) -> list[str]:
    """The arms --defences adds: the safety-loss mix (the study's other defence, which the issue ranks with them),
    then each defence, a post-hoc one after the arm it repairs."""
    arms: list[str] = ["safety_loss"] if settings.defence_list else []
    for name in settings.defence_list:
        source = POST_HOC_SOURCE.get(name)
        if source not in (None, "plain", *settings.extensions, *arms):
            arms.append(source)
        arms.append(name)
    return arms
