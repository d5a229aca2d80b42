"""`direction` as one call: split and filter the prompts, compute the candidates, select one as the original does,
measure what it does (and, with a mask, how it relates to the safety-critical weights), and write the original's
files: direction.pt, direction_metadata.json (`pos`, `layer`), direction_evaluations.json and
generate_directions/mean_diffs.pt, with direction_scores.png and direction_report.json."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from safeneurons.data.readers import check_sources
from safeneurons.data.samples import load_prompts
from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.generation import Decoding
from safeneurons.interp.direction.candidates import Candidates, compute_candidates, prompt_scores
from safeneurons.interp.direction.effects import (EffectSettings, direction_effects, generations_under, judged,
                                                  mean_refusal_score, random_controls)
from safeneurons.interp.direction.positions import check_prompts_end_with, post_instruction_tokens
from safeneurons.interp.direction.report import plot_scores, summary_lines
from safeneurons.interp.direction.selection import (CandidateScore, SelectionConfig, evaluations_json, score_candidates,
                                                    select)
from safeneurons.interp.patching.metrics import refusal_metric, refusal_token_ids
from safeneurons.interp.patching.run import publish_files
from safeneurons.interp.patching.sites import REFUSAL_STARTS
from safeneurons.models.loading import ModelSource, load_config
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import check_output_dir, write_json


@dataclass(frozen=True)
class RefusalDirectionConfig:
    harmful: str = "demo-harmful"
    harmless: str = "demo-harmless"
    n_train: int = 32  # prompts of each set for the candidates (the original: 128)
    n_val: int = 16  # for the selection (the original: 32); the rest of each set is the held-out test
    seed: int = 42  # the original's random.seed(42)
    filter_train: bool = True  # keep harmful prompts the model refuses (score > 0), harmless it does not (< 0)
    filter_val: bool = True
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    eval_limit: int = 32  # held-out prompts of each set to evaluate on
    max_new_tokens: int = 32
    random_directions: int = 0  # --compare-random: random directions of the same norm as controls
    perplexity_data: str | None = None  # harmless text: perplexity at baseline, under ablation and subtraction
    perplexity_samples: int = 32
    max_length: int = 256  # tokens per perplexity text
    masks: str | None = None  # link the direction to these safety-critical weights
    save_orthogonalized: str | None = None
    refusal_starts: tuple[str, ...] = REFUSAL_STARTS
    data_dir: str | None = None
    judge: str = "jailbreakbench"  # the original's substring judge, or Wei et al.'s "keyword" (with its word rule)
    perplexity_warning_factor: float = 2.0  # the report warns when ablation multiplies perplexity by more

    def validate(self) -> None:
        from safeneurons.evaluation.metrics import SUBSTRING_JUDGES

        if self.judge not in SUBSTRING_JUDGES:
            raise SafeneuronsError(f"--judge {self.judge!r} is not one of {', '.join(SUBSTRING_JUDGES)}")
        if not self.perplexity_warning_factor > 1:
            raise SafeneuronsError(f"--perplexity-warning-factor {self.perplexity_warning_factor} must be > 1")
        if not self.refusal_starts or not all(start.strip() for start in self.refusal_starts):
            raise SafeneuronsError(f"--refusal-starts {list(self.refusal_starts)} must be non-empty texts")
        self.selection.validate()
        for name in ("n_train", "n_val", "eval_limit", "max_new_tokens", "perplexity_samples", "max_length"):
            if getattr(self, name) < 1:
                raise SafeneuronsError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a positive integer")
        if self.random_directions < 0:
            raise SafeneuronsError(f"--compare-random {self.random_directions} must be >= 0")

    def check_inputs(self, model: ModelSource, out: str | Path) -> None:
        """Before any model loads: the outputs, the data, the mask's fit and the model's structure."""
        check_output_dir(out)
        if self.save_orthogonalized:
            check_output_dir(self.save_orthogonalized)
            from safeneurons.interventions.orthogonalize import check_orthogonalizable

            check_orthogonalizable(load_config(model.name, model.cache_dir))
        check_sources(self.harmful, self.harmless, self.perplexity_data, directory=self.data_dir)
        from safeneurons.data.readers import load_examples

        for what, source in (("harmful", self.harmful), ("harmless", self.harmless)):
            check_split_sizes(len(load_examples(source, self.data_dir)), self, what)
        if self.masks:
            from safeneurons.masks.io import check_mask_file_fits

            if model.deepspeed:
                raise SafeneuronsError("--masks links the direction to whole weight matrices: run it without "
                                       "--deepspeed")
            check_mask_file_fits(self.masks, model.name, model.cache_dir)


@dataclass
class Splits:
    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]
    harmful_test: list[str]
    harmless_test: list[str]
    filtered: dict[str, int] = field(default_factory=dict)  # prompts the filter removed, per split


def check_split_sizes(count: int, config: RefusalDirectionConfig, what: str) -> None:
    needed = config.n_train + config.n_val + 1
    if count < needed:
        raise SafeneuronsError(f"--{what} has {count} prompts; --n-train {config.n_train} + --n-val "
                               f"{config.n_val} + at least one held-out prompt needs {needed}")


def draw(prompts: Sequence[str], config: RefusalDirectionConfig, what: str) -> tuple[list[str], list[str], list[str]]:
    """Train, validation and held-out test prompts, drawn without overlap with `seed`."""
    check_split_sizes(len(prompts), config, what)
    order = random.Random(config.seed).sample(range(len(prompts)), len(prompts))
    picked = [prompts[index] for index in order]
    train, val = picked[:config.n_train], picked[config.n_train:config.n_train + config.n_val]
    return train, val, picked[config.n_train + config.n_val:][:config.eval_limit]


def filtered(prompts: list[str], scores: Sequence[float], harmful: bool, split: str) -> list[str]:
    kept = [prompt for prompt, score in zip(prompts, scores) if (score > 0 if harmful else score < 0)]
    if not kept:
        rule = "the model refuses (refusal score > 0)" if harmful else "it does not refuse (refusal score < 0)"
        raise SafeneuronsError(f"no {'harmful' if harmful else 'harmless'} {split} prompt is left after the "
                               f"original's filter (it keeps the prompts {rule}); switch it off with "
                               f"--no-filter-{split}")
    return kept


@dataclass
class RefusalDirectionResult:
    position: int
    layer: int
    direction: torch.Tensor  # the raw mean difference at (position, layer), float64
    scores: list[CandidateScore]
    selected: CandidateScore
    candidates: Candidates
    report: dict[str, Any]


def make_splits(loaded: Any, config: RefusalDirectionConfig, refusal: Any) -> Splits:
    tokenizer = loaded.tokenizer
    sets = {what: load_prompts(source, tokenizer, None, config.data_dir)
            for what, source in (("harmful", config.harmful), ("harmless", config.harmless))}
    (harmful_train, harmful_val, harmful_test), (harmless_train, harmless_val, harmless_test) = (
        draw(sets["harmful"], config, "harmful"), draw(sets["harmless"], config, "harmless"))
    splits = Splits(harmful_train, harmless_train, harmful_val, harmless_val, harmful_test, harmless_test)
    for split, active in (("train", config.filter_train), ("val", config.filter_val)):
        if not active:
            continue
        for harmful in (True, False):
            name = f"{'harmful' if harmful else 'harmless'}_{split}"
            prompts = getattr(splits, name)
            scores = prompt_scores(loaded.model, tokenizer, prompts, lambda logits: refusal.compute(logits, None),
                                   config.selection.batch_size, desc=f"filter {name}")
            setattr(splits, name, filtered(prompts, scores, harmful, split))
            splits.filtered[name] = len(prompts) - len(getattr(splits, name))
    return splits


def find_direction(loaded: Any, config: RefusalDirectionConfig) -> tuple[RefusalDirectionResult, Splits]:
    """Collective: splits, candidates, selection and the direction's effects (rates on rank 0)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    token_ids = post_instruction_tokens(tokenizer)
    refusal = refusal_metric(refusal_token_ids(tokenizer, config.refusal_starts))
    splits = make_splits(loaded, config, refusal)
    for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
        check_prompts_end_with(tokenizer, getattr(splits, name), token_ids, name.replace("_", " "))
    candidates = compute_candidates(model, tokenizer, splits.harmful_train, splits.harmless_train, token_ids,
                                    config.selection.batch_size)
    scores = score_candidates(model, tokenizer, candidates, splits.harmful_val, splits.harmless_val, refusal,
                              config.selection)
    best, chosen_by = select(scores, candidates.directions.shape[1], config.selection)
    direction = candidates.at(best.position, best.layer)
    settings = EffectSettings(Decoding(max_new_tokens=config.max_new_tokens), config.selection.batch_size,
                              config.random_directions, perplexity_texts(tokenizer, config), config.judge)
    effects = direction_effects(model, tokenizer, direction.float(), best.layer, splits.harmful_test,
                                splits.harmless_test, settings, refusal)
    effects["random_directions"] = random_controls(model, tokenizer, direction.float(), best.layer,
                                                   splits.harmful_test, splits.harmless_test, settings)
    report = {"selected": asdict(best), "selected_despite_filter": best.discarded is not None,
              "selected_by": chosen_by, "judge": config.judge,
              "warnings": perplexity_warnings(effects.get("perplexity") or {}, config.perplexity_warning_factor),
              "post_instruction_tokens": [tokenizer.decode([token]) for token in token_ids],  # text, not Ġ-pieces
              "refusal_token_ids": refusal.detail["refusal_token_ids"], "selection": asdict(config.selection),
              "splits": {name: len(getattr(splits, name)) for name in ("harmful_train", "harmless_train",
                                                                        "harmful_val", "harmless_val",
                                                                        "harmful_test", "harmless_test")},
              "filtered": splits.filtered, "direction_norm": float(direction.norm()), "effects": effects}
    return RefusalDirectionResult(best.position, best.layer, direction, scores, best, candidates, report), splits


def perplexity_warnings(measured: dict[str, float], factor: float) -> list[str]:
    """A line for each edit that multiplies the harmless text's perplexity (`measured`, with its "baseline") by
    more than `factor`."""
    baseline = measured.get("baseline")
    return [f"{name} raises perplexity {value / baseline:.1f}-fold ({baseline:.3f} -> {value:.3f}): the direction's "
            f"edit damages the model, not only its refusal" for name, value in measured.items()
            if name != "baseline" and baseline and value > factor * baseline]


def perplexity_texts(tokenizer: Any, config: RefusalDirectionConfig) -> list[Any]:
    """The first --perplexity-samples texts of --perplexity-data, tokenised (none without it)."""
    if not config.perplexity_data:
        return []
    from safeneurons.data.readers import load_examples
    from safeneurons.evaluation.perplexity import text_samples

    examples = load_examples(config.perplexity_data, config.data_dir)[:config.perplexity_samples]
    return text_samples(examples, tokenizer, config.max_length)


def measure_on(prompts: Sequence[str], settings: EffectSettings, refusal: Any, tokenizer: Any) -> Any:
    """`measure(model)`: the mean refusal score and the judged greedy generations of `prompts`."""
    import contextlib

    def measure(model: Any) -> dict[str, Any]:
        return {"refusal_score": mean_refusal_score(model, tokenizer, prompts, contextlib.nullcontext, refusal,
                                                    settings.batch_size),
                **(judged(generations_under(model, tokenizer, prompts, contextlib.nullcontext, settings,
                                            "harmful prompts"), settings.judge) or {})}

    return measure


def run_refusal_direction(model: ModelSource, config: RefusalDirectionConfig,
                          out: str | Path) -> RefusalDirectionResult | None:
    """Collective: the whole stage, written to `out` (rank 0); the result on rank 0, None elsewhere."""
    config.validate()
    config.check_inputs(model, out)
    context = distributed.init_distributed(require_process_group=model.deepspeed is not None)
    loaded = model.load(context.device)
    result, splits = find_direction(loaded, config)
    refusal = refusal_metric(result.report["refusal_token_ids"])
    settings = EffectSettings(Decoding(max_new_tokens=config.max_new_tokens), config.selection.batch_size, 0,
                              judge=config.judge)
    measure = measure_on(splits.harmful_test, settings, refusal, loaded.tokenizer)
    if config.masks:
        from safeneurons.interp.direction.links import links
        from safeneurons.masks.io import load_masks

        result.report["links"] = links(loaded.model, load_masks(config.masks), result.direction.float(), measure,
                                       str(config.masks))
    result.report["orthogonalized"] = orthogonalized_effects(loaded, result, measure, model,
                                                             perplexity_texts(loaded.tokenizer, config))
    if "perplexity" in result.report["orthogonalized"]:
        result.report["warnings"] += perplexity_warnings(
            {"baseline": result.report["effects"]["perplexity"]["baseline"],
             "orthogonalized": result.report["orthogonalized"]["perplexity"]}, config.perplexity_warning_factor)
    if config.save_orthogonalized and distributed.is_main():
        save_orthogonalized(model, result, config.save_orthogonalized)
    if not distributed.is_main():
        return None
    write_outputs(result, out, model, config)
    return result


def orthogonalized_effects(loaded: Any, result: RefusalDirectionResult, measure: Any, model: ModelSource,
                           texts: Sequence[Any] = ()) -> dict[str, Any]:
    """The orthogonalized model on the held-out harmful prompts (the loaded model is edited in place: last)."""
    from safeneurons.interventions.orthogonalize import check_orthogonalizable, orthogonalize_model

    if model.deepspeed:
        return {"measured": False, "why": "the weights are ZeRO-3 partitions: evaluate the --save-orthogonalized "
                                          "folder with `safeneurons eval`"}
    try:
        check_orthogonalizable(loaded.model.config)
    except SafeneuronsError as error:
        return {"measured": False, "why": str(error)}
    edit = orthogonalize_model(loaded.model, result.direction.float())
    found = {"measured": True, **edit.to_json(), "harmful": measure(loaded.model)}
    if texts:
        from safeneurons.evaluation.perplexity import perplexity

        found["perplexity"] = perplexity(loaded.model, loaded.tokenizer, texts)
    return found


def save_orthogonalized(model: ModelSource, result: RefusalDirectionResult, out: str) -> None:
    """Rank 0: the model's files rewritten tensor by tensor with r̂ projected out (staged, one rename)."""
    from safeneurons.interventions.orthogonalize import orthogonalize_files
    from safeneurons.models.loading import local_model_folder
    from safeneurons.runtime.outputs import staged

    with staged(out) as staging:
        edit = orthogonalize_files(local_model_folder(model.name, model.cache_dir), result.direction, staging)
        write_json(staging / "orthogonalize_summary.json", {**edit.to_json(), "model": model.name,
                                                             "position": result.position, "layer": result.layer})


def write_outputs(result: RefusalDirectionResult, out: str | Path, model: ModelSource,
                  config: RefusalDirectionConfig) -> None:
    tokens = result.report["post_instruction_tokens"]
    report = {"model": model.name, "harmful": config.harmful, "harmless": config.harmless, "seed": config.seed,
              **result.report}

    def mean_diffs(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result.candidates.directions, path)

    publish_files(out, {
        "direction.pt": lambda path: torch.save(result.direction.clone(), path),
        "direction_metadata.json": lambda path: write_json(path, {"pos": result.position, "layer": result.layer}),
        "direction_evaluations.json": lambda path: write_json(path, evaluations_json(result.scores)),
        "generate_directions/mean_diffs.pt": mean_diffs,
        "direction_scores.png": lambda path: plot_scores(result.scores, tokens, result.report["effects"], path),
        "direction_report.json": lambda path: write_json(path, report)})
    print("\n".join(summary_lines(report)))
    print(f"-> {out}/direction.pt, direction_metadata.json, direction_evaluations.json, direction_report.json")
