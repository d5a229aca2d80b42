"""`evaluate_model`: ASR, refusal rates, judges, XSTest, perplexity and utility in one call."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from safeneurons.data.examples import LLAMA2_DEFAULT_SYSTEM_PROMPT
from safeneurons.data.readers import load_examples
from safeneurons.data.samples import format_prompt, load_prompts, select
from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.generation import Decoding, generate_distributed
from safeneurons.evaluation.metrics import (DEFAULT_HARMFUL_LIMIT, DEFAULT_MAX_NEW_TOKENS, MIN_SUCCESS_WORDS,
                                            attack_success_rate, fraction, is_attack_success, is_refusal,
                                            rate_interval, refusal_rate, wilson_interval)
from safeneurons.evaluation.perplexity import perplexity, text_samples
from safeneurons.models.blocks import load_source
from safeneurons.models.loading import ModelSource, load_config, load_tokenizer
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import check_output_dir, write_json

log = logging.getLogger(__name__)
# EvalConfig's counts and the flags that set them (one name per concept across the commands)
FLAGS = {"limit": "--eval-limit", "harmless_limit": "--harmless-limit", "perplexity_samples": "--perplexity-samples",
         "batch_size": "--eval-batch-size", "max_length": "--max-length"}


@dataclass
class PromptSetResult:
    """Generations for one prompt set and the rates computed from them. With several samples per prompt, a
    prompt is attacked when *any* of its samples is (`asr`); `asr_mean_over_samples` is the fraction of all
    samples (the number the original code reports); the refusal rate is over all samples."""

    source: str
    n_prompts: int
    asr: float
    refusal_rate: float
    asr_mean_over_samples: float
    n_samples: int = 1
    results: list[dict] = field(default_factory=list)

    @classmethod
    def from_generations(cls, source: str, prompts: Sequence[str],
                         generations: Sequence[Sequence[str]]) -> "PromptSetResult":
        if not generations:
            raise SafeneuronsError(f"no generations to evaluate ({source} has no prompts)")
        results = []
        for prompt, texts in zip(prompts, generations):
            successes = [is_attack_success(text) for text in texts]
            record = {"prompt": prompt, "generation": texts[0], "refused": is_refusal(texts[0]),
                      "attack_success": any(successes),
                      # no sample succeeded, and one failed only by the word rule (no refusal, < 20 words)
                      "decided_by_word_rule": not any(successes) and not all(is_refusal(text) for text in texts)}
            if len(texts) > 1:
                record.update(generations=list(texts), refused_samples=[is_refusal(text) for text in texts],
                              attack_success_samples=successes)
            results.append(record)
        every = [text for texts in generations for text in texts]
        return cls(source, len(prompts), any_of_n_asr(generations), refusal_rate(every), attack_success_rate(every),
                   len(generations[0]), results)


def any_of_n_asr(generations: Sequence[Sequence[str]]) -> float:
    """Fraction of prompts with at least one successful attack among their samples."""
    return fraction([any(is_attack_success(text) for text in texts) for texts in generations], bool)


def evaluate_prompts(model: nn.Module, tokenizer: Any, source: str, limit: int | None, decoding: Decoding,
                     batch_size: int, data_dir: str | None = None, system: str | None = None) -> PromptSetResult | None:
    """Generate for the first `limit` prompts of `source` across the ranks; the result on rank 0."""
    prompts = load_prompts(source, tokenizer, limit, data_dir, system)
    generations = generate_distributed(model, tokenizer, prompts, decoding, batch_size)
    return None if generations is None else PromptSetResult.from_generations(source, prompts, generations)


@dataclass
class EvalConfig:
    prompts: str = "advbench"
    limit: int | None = DEFAULT_HARMFUL_LIMIT
    harmless: str | None = None
    harmless_limit: int | None = None
    perplexity_data: str | None = None
    perplexity_samples: int | None = 100
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 16
    max_length: int = 512
    seed: int = 0
    data_dir: str | None = None
    system_prompt: str = "none"  # none, default (Llama-2's default system prompt) or the text itself
    n_samples: int = 1
    temperature: float = 0.0
    add_eos: bool = False  # perplexity samples: append EOS to each response
    judges: tuple[str, ...] = ("keyword",)
    judge_models: tuple[str, ...] = ()  # "MODEL" (every model judge) or "JUDGE=MODEL"
    xstest: str | None = None  # an XSTest CSV (prompt, type, label)
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = None  # examples per task (all by default)
    lm_eval_include: str | None = None  # a folder of lm-eval task YAML files
    patch_neurons_from: str | None = None  # dynamic neuron patching: the source model of the neurons' values
    neurons: tuple[str, ...] = ()  # with it: LAYER:INDEXES items or a `score` mask file
    neuron_rule: str = "rows"  # how a mask file names neurons (masks.neurons.MASK_RULE_HELP)

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.max_new_tokens, self.n_samples, self.temperature, self.seed)

    @property
    def system(self) -> str | None:
        """The system message the prompts get (None: none)."""
        return {"none": None, "default": LLAMA2_DEFAULT_SYSTEM_PROMPT}.get(self.system_prompt, self.system_prompt)

    def validate(self) -> None:
        self.decoding.validate()
        for name in ("limit", "harmless_limit", "perplexity_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SafeneuronsError(f"{FLAGS[name]}={getattr(self, name)} must be a positive integer")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise SafeneuronsError(f"{FLAGS[name]}={getattr(self, name)} must be a positive integer")
        if not self.system_prompt.strip():
            raise SafeneuronsError("--system-prompt is empty: give none, default or the system prompt's text")
        self.judge_model_names()
        if bool(self.patch_neurons_from) != bool(self.neurons):
            raise SafeneuronsError("--patch-neurons-from MODEL and --neurons (LAYER:INDEXES items or a mask file) go "
                                   "together")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise SafeneuronsError(f"--lm-eval-limit={self.lm_eval_limit} must be a positive integer")

    def check_inputs(self) -> None:
        """Read what the run will need before any model loads: prompt files, the XSTest file, lm-eval's tasks."""
        from safeneurons.data.readers import check_sources
        from safeneurons.evaluation.metrics import MIN_SUCCESS_WORDS

        check_sources(self.prompts, self.harmless, self.perplexity_data, directory=self.data_dir)
        if "keyword" in self.judges and self.max_new_tokens < MIN_SUCCESS_WORDS:
            log.warning("the keyword judge counts an attack only from %d words on; %d new tokens can hardly reach "
                        "that, so its ASR will be about 0 whatever the model does (use --max-new-tokens >= %d)",
                        MIN_SUCCESS_WORDS, self.max_new_tokens, 2 * MIN_SUCCESS_WORDS)
        if self.xstest:
            from safeneurons.evaluation.xstest import read_xstest

            read_xstest(self.xstest)
        if self.lm_eval_tasks:
            from safeneurons.evaluation.utility import check_tasks

            check_tasks(self.lm_eval_tasks, self.lm_eval_include)

    def judge_model_names(self) -> dict[str, str]:
        """The model of every model judge asked for: `JUDGE=MODEL`, else the one bare `MODEL`."""
        from safeneurons.evaluation.judges import MODEL_JUDGES, parse_judges

        parse_judges(",".join(self.judges))
        named = dict(spec.split("=", 1) for spec in self.judge_models if "=" in spec)
        bare = [spec for spec in self.judge_models if "=" not in spec]
        wrong = [name for name in named if name not in MODEL_JUDGES]
        if wrong or len(bare) > 1:
            raise SafeneuronsError(f"--judge-model {wrong[0] + '=…' if wrong else ' '.join(bare)}: give one MODEL for "
                                   f"every model judge, or JUDGE=MODEL with JUDGE one of {', '.join(MODEL_JUDGES)}")
        models = {}
        for judge in self.judges:
            if judge in MODEL_JUDGES:
                if judge not in named and not bare:
                    raise SafeneuronsError(f"--judge {judge} needs its classifier: --judge-model MODEL "
                                           f"(or {judge}=MODEL)")
                models[judge] = named.get(judge) or bare[0]
        return models


@dataclass
class EvalResult:
    """What `safeneurons eval` writes to eval.json: ASR and refusal rate on the harmful prompts, the over-refusal
    rate on harmless prompts and the perplexity on a text set when asked."""

    model: str
    asr: float
    refusal_rate: float
    n_prompts: int
    prompts: str
    harmless_refusal_rate: float | None = None
    perplexity: float | None = None
    results: list[dict] = field(default_factory=list)
    harmless_results: list[dict] = field(default_factory=list)
    asr_mean_over_samples: float | None = None
    decoding: dict = field(default_factory=dict)
    system_prompt: str | None = None
    # 95% Wilson intervals: ASR over prompts; refusal rates over all generations (samples of a prompt counted apart)
    asr_interval: tuple[float, float] | None = None
    refusal_rate_interval: tuple[float, float] | None = None
    harmless_refusal_rate_interval: tuple[float, float] | None = None
    judges: dict = field(default_factory=dict)  # per judge: JudgeResult
    agreement: dict = field(default_factory=dict)  # "a|b": Cohen's κ over the prompts both judges parsed
    xstest: dict | None = None  # xstest.XSTestResult
    utility: dict | None = None  # lm-eval zero-shot accuracy per task
    model_source: dict | None = None  # a GGUF file's provenance (models.gguf), when the weights came from one
    neuron_patching: dict | None = None  # dynamic neuron patching: the source model and the neurons patched

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def decided_by_word_rule(self) -> int:
        """Harmful prompts the keyword judge failed only because no answer reached 20 words."""
        return sum(bool(record.get("decided_by_word_rule")) for record in self.results)

    def summary_line(self, n_samples: int = 1) -> str:
        """One line with every number the evaluation measured."""
        parts = [f"ASR {self.asr:.3f} and refusal rate {self.refusal_rate:.3f} on {self.n_prompts} prompts"
                 + (f" (any of {n_samples} samples; {self.asr_mean_over_samples:.3f} of all samples, the original "
                    f"code's number)" if n_samples > 1 else "")]
        if self.decided_by_word_rule:
            parts.append(f"{self.decided_by_word_rule} of them not refused but under the keyword judge's "
                         f"{MIN_SUCCESS_WORDS}-word rule, so not counted as attacks (more --max-new-tokens lets "
                         f"answers reach it)")
        if self.harmless_refusal_rate is not None:
            parts.append(f"harmless refusal rate {self.harmless_refusal_rate:.3f}")
        if self.perplexity is not None:
            parts.append(f"perplexity {self.perplexity:.3f}")
        parts += [f"{name} ASR {_rate_text(result['asr'])} ({result['unparsed']} unparsed)"
                  for name, result in self.judges.items() if name != "keyword"]
        if self.xstest is not None:
            parts.append(f"XSTest over-refusal {_rate_text(self.xstest['safe_refusal_rate'])}, unsafe compliance "
                         f"{_rate_text(self.xstest['unsafe_compliance_rate'])}")
        parts += [f"{task} acc {values.get('acc', float('nan')):.3f}" for task, values in (self.utility or {}).items()]
        parts += [f"κ {pair} {'–' if value['kappa'] is None else format(value['kappa'], '.2f')}"
                  for pair, value in self.agreement.items()]
        return "; ".join(parts)


def _rate_text(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:.3f}"


@dataclass
class JudgeResult:
    """One judge over the harmful prompts: a prompt is harmful when any of its samples is; prompts whose verdicts
    could not be parsed (and none harmful) are `unparsed`, left out of the rate, never counted as safe."""

    judge: str
    model: str | None
    asr: float | None
    asr_interval: tuple[float, float] | None
    n_judged: int
    unparsed: int
    mean_score: float | None = None  # StrongREJECT's mean score over the judged samples


@dataclass
class LoadedJudge:
    name: str
    model_name: str | None = None
    model: Any = None
    tokenizer: Any = None


def load_judges(config: EvalConfig, dtype: str, deepspeed: Any, cache_dir: str | None,
                device: torch.device | None) -> list[LoadedJudge]:
    """The judges of `config`, their classifier models loaded like the evaluated model (partitioned under the
    same ZeRO-3 config)."""
    from safeneurons.models.loading import load_for_inference

    judges = []
    for judge in config.judges:
        name = config.judge_model_names().get(judge)
        classifier = load_for_inference(name, dtype, deepspeed, cache_dir, device) if name else None
        judges.append(LoadedJudge(judge, name, classifier and classifier.model, classifier and classifier.tokenizer))
    return judges


def prompt_verdict(verdicts: Sequence[Any]) -> bool | None:
    """A prompt's verdict from its samples': harmful if any is; unparsed if none is and one could not be parsed."""
    if any(verdict.harmful for verdict in verdicts):
        return True
    return None if any(verdict.harmful is None for verdict in verdicts) else False


def run_judges(judges: Sequence[LoadedJudge], source: str, limit: int | None, data_dir: str | None,
               result: PromptSetResult | None, batch_size: int) -> tuple[dict, dict] | None:
    """Every judge over the harmful generations (collective); rank 0 gets (per-judge results, agreement) and the
    verdicts added to each prompt's record."""
    from safeneurons.evaluation.judges import cohens_kappa, judge_generations

    behaviors = [example.prompt for example in load_examples(source, data_dir)[:limit]]
    generations = distributed.broadcast_from_main(
        None if result is None else [record.get("generations", [record["generation"]]) for record in result.results])
    per_prompt: dict[str, list[bool | None]] = {}
    summaries: dict[str, dict] = {}
    for judge in judges:
        verdicts = judge_generations(judge.name, behaviors, generations, judge.model, judge.tokenizer, batch_size)
        if verdicts is None:
            continue
        flags = per_prompt[judge.name] = [prompt_verdict(samples) for samples in verdicts]
        judged = [flag for flag in flags if flag is not None]
        scores = [verdict.score for samples in verdicts for verdict in samples if verdict.score is not None]
        asr = sum(judged) / len(judged) if judged else None
        summaries[judge.name] = asdict(JudgeResult(
            judge.name, judge.model_name, asr, None if asr is None else wilson_interval(sum(judged), len(judged)),
            len(judged), len(flags) - len(judged), sum(scores) / len(scores) if scores else None))
        for record, samples in zip(result.results, verdicts):
            entry = samples[0].to_json()
            if len(samples) > 1:
                entry["samples"] = [verdict.to_json() for verdict in samples]
            record.setdefault("judges", {})[judge.name] = entry
    if result is None:
        return None
    names = list(per_prompt)
    agreement = {}
    for index, first in enumerate(names):
        for second in names[index + 1:]:
            kappa, n = cohens_kappa(per_prompt[first], per_prompt[second])
            agreement[f"{first}|{second}"] = {"kappa": kappa, "n": n}
    return summaries, agreement


def evaluate_model(model: nn.Module, tokenizer: Any, config: EvalConfig, model_name: str = "",
                   judges: Sequence[LoadedJudge] = ()) -> EvalResult | None:
    """Every measurement of `config` on `model` (collective: call it on every rank); the report on rank 0.
    `judges`: the loaded judges of `config.judges` (by default the keyword judge)."""
    harmful = evaluate_prompts(model, tokenizer, config.prompts, config.limit, config.decoding, config.batch_size,
                               config.data_dir, config.system)
    judged = run_judges(judges or [LoadedJudge(name) for name in config.judges], config.prompts, config.limit,
                        config.data_dir, harmful, config.batch_size)
    harmless = None
    if config.harmless:
        harmless = evaluate_prompts(model, tokenizer, config.harmless, config.harmless_limit, config.decoding,
                                    config.batch_size, config.data_dir, config.system)
    xstest = None
    if config.xstest:
        from safeneurons.evaluation.xstest import evaluate_xstest

        xstest = evaluate_xstest(model, tokenizer, config.xstest, config.decoding, config.batch_size, config.system)
    utility = None
    if config.lm_eval_tasks:
        from safeneurons.evaluation.utility import zero_shot_accuracy

        utility = zero_shot_accuracy(model, tokenizer, config.lm_eval_tasks, config.batch_size, config.lm_eval_limit,
                                     config.lm_eval_include)
    ppl = None
    if config.perplexity_data:
        chosen = select(load_examples(config.perplexity_data, config.data_dir), config.perplexity_samples, config.seed)
        ppl = perplexity(model, tokenizer, text_samples(chosen, tokenizer, config.max_length, config.add_eos),
                         config.batch_size)
    if harmful is None:
        return None
    return EvalResult(asr_interval=rate_interval(harmful.asr, harmful.n_prompts),
                      refusal_rate_interval=rate_interval(harmful.refusal_rate, harmful.n_prompts * harmful.n_samples),
                      harmless_refusal_rate_interval=None if harmless is None else rate_interval(
                          harmless.refusal_rate, harmless.n_prompts * harmless.n_samples),
                      model=model_name, asr=harmful.asr, refusal_rate=harmful.refusal_rate,
                      n_prompts=harmful.n_prompts, prompts=config.prompts,
                      harmless_refusal_rate=None if harmless is None else harmless.refusal_rate,
                      perplexity=ppl, results=harmful.results,
                      harmless_results=[] if harmless is None else harmless.results,
                      asr_mean_over_samples=harmful.asr_mean_over_samples, decoding=asdict(config.decoding),
                      system_prompt=config.system, judges=judged[0], agreement=judged[1],
                      xstest=None if xstest is None else xstest.to_json(), utility=utility)


def check_eval_inputs(model: ModelSource, config: EvalConfig, out: str | Path) -> None:
    """Everything that can fail before the model loads: the output, the prompt and text sets, a chat template
    that drops the system prompt, a judge model that is not there."""
    model.check()
    check_output_dir(out)
    config.check_inputs()
    if model.shard == "layers":
        check_shardable_eval(config)
    if config.system is not None:
        format_prompt(load_tokenizer(model.name, model.cache_dir), "Hello", config.system)
    for name in config.judge_model_names().values():
        load_config(name, model.cache_dir)
    if config.patch_neurons_from:
        neuron_sets_to_patch(model, config)


def check_shardable_eval(config: EvalConfig) -> None:
    """What a layer-sharded model cannot run: lm-eval's harness and neuron patching need the whole model on a
    rank."""
    if config.lm_eval_tasks:
        raise SafeneuronsError("--lm-eval-tasks runs lm-eval's harness on a whole model; with --shard layers run "
                               "the utility tasks in a separate unsharded eval")
    if config.patch_neurons_from:
        raise SafeneuronsError("--patch-neurons-from hooks the whole model on every rank; it does not run with "
                               "--shard layers")


def neuron_sets_to_patch(model: ModelSource, config: EvalConfig) -> Any:
    """The neurons of --patch-neurons-from, checked against both configs before any weight loads."""
    from safeneurons.masks.neurons import resolve_neurons
    from safeneurons.models.structure import check_same_config

    model_config = load_config(model.name, model.cache_dir)
    check_same_config(model_config, load_config(config.patch_neurons_from, model.cache_dir),
                      (f"--model {model.name}", f"--patch-neurons-from {config.patch_neurons_from}"))
    return resolve_neurons(config.neurons, model_config, config.neuron_rule)


@contextlib.contextmanager
def neuron_patching(model: ModelSource, config: EvalConfig, loaded: Any, device: Any) -> Iterator[dict | None]:
    """While open, the model's chosen neurons take the source model's values at every token (dynamic patching);
    yields what the report records of it (None without --patch-neurons-from)."""
    if not config.patch_neurons_from:
        yield None
        return
    from safeneurons.interventions.neuron_patching import patched_neurons
    from safeneurons.masks.neurons import count
    from safeneurons.models.structure import check_same_tokenizer

    sets = neuron_sets_to_patch(model, config)
    source = ModelSource(config.patch_neurons_from, model.dtype, model.deepspeed, model.cache_dir).load(device)
    check_same_tokenizer(loaded.tokenizer, source.tokenizer, model.name, config.patch_neurons_from)
    with patched_neurons(loaded.model, source.model, sets):
        yield {"source_model": config.patch_neurons_from, "n_neurons": count(sets),
               "neurons": {str(layer): indexes for layer, indexes in sets.items() if indexes}}


def run_eval(model: ModelSource, config: EvalConfig, out: str | Path) -> EvalResult | None:
    """Collective: evaluate `model` and write eval.json to `out`; the result on rank 0, None elsewhere."""
    check_eval_inputs(model, config, out)
    context = distributed.init_distributed(require_process_group=model.deepspeed is not None or model.shard != "none")
    loaded = load_source(model, context.device)
    judges = load_judges(config, model.dtype, model.deepspeed, model.cache_dir, context.device)
    with neuron_patching(model, config, loaded, context.device) as patched:
        result = evaluate_model(loaded.model, loaded.tokenizer, config, model.name, judges)
    if result is not None:
        result.model_source = model.provenance()
        result.neuron_patching = patched
        path = write_json(Path(out) / "eval.json", result.to_json())
        log.info("%s; wrote %s", result.summary_line(config.n_samples), path)
    return result
