"""Selecting the direction as the original does. For each candidate (position, layer), with its unit direction r̂:
bypass = mean refusal score of the harmful validation prompts with r̂ ablated everywhere; induce = mean refusal
score of the harmless ones with the raw mean difference added at that layer's input; KL = mean KL(baseline ‖
ablated) of the harmless prompts' last-position distributions. Candidates from the last `prune_layer_fraction` of
the layers, with KL above the threshold, induce below its threshold or a NaN are discarded; the lowest bypass wins.
When the filter keeps none, the original stops (`error`); by default we take the lowest bypass among the
candidates of the kept layers whose KL stays under a looser bound (`kl_bounded`, reported as a fallback), since
the lowest bypass of all (`lowest_bypass`) is often a direction whose ablation destroys the model.

Candidates are scored `candidates_per_pass` at a time in one forward pass (the prompt batch repeated, each copy
edited with its own direction); the passes are split across ranks and gathered in order.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.direction import hooks
from safeneurons.interp.direction.candidates import Candidates, encode, last_logits
from safeneurons.models.hooks import Hooks
from safeneurons.models.structure import decoder_layers, layers_from, model_device
from safeneurons.runtime.distributed import map_fixed_batches
from safeneurons.runtime.zero3 import is_zero3_partitioned

WHEN_ALL_DISCARDED = ("kl_bounded", "error", "lowest_bypass")


@dataclass(frozen=True)
class SelectionConfig:
    kl_threshold: float = 0.1  # the original's defaults
    induce_threshold: float = 0.0
    prune_layer_fraction: float = 0.2
    batch_size: int = 16  # prompts per pass
    candidates_per_pass: int = 8
    when_all_discarded: str = "kl_bounded"  # the fallback when the filter keeps none (WHEN_ALL_DISCARDED)
    fallback_kl_threshold: float = 1.0  # kl_bounded's looser KL bound (10 x the original's; never below kl_threshold)

    def validate(self) -> None:
        if self.when_all_discarded not in WHEN_ALL_DISCARDED:
            raise SafeneuronsError(f"--when-all-discarded {self.when_all_discarded!r} is not one of "
                                   f"{', '.join(WHEN_ALL_DISCARDED)}")
        if not self.kl_threshold >= 0 or not 0 <= self.prune_layer_fraction < 1:
            raise SafeneuronsError(f"--kl-threshold {self.kl_threshold} must be >= 0 and --prune-layer-fraction "
                                   f"{self.prune_layer_fraction} in [0, 1)")
        if not self.fallback_kl_threshold >= 0:
            raise SafeneuronsError(f"--fallback-kl-threshold {self.fallback_kl_threshold} must be >= 0")
        if self.batch_size < 1 or self.candidates_per_pass < 1:
            raise SafeneuronsError(f"--batch-size {self.batch_size} and --candidates-per-pass "
                                   f"{self.candidates_per_pass} must be positive")


@dataclass
class CandidateScore:
    position: int
    layer: int
    refusal_score: float  # bypass: the harmful prompts' mean refusal score under ablation (the original's name)
    steering_score: float  # induce: the harmless prompts' mean refusal score under addition
    kl_div_score: float
    discarded: str | None = None  # why the filter discarded it


def kl_divergence(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ edited) per row, in float64 from log-probabilities (exact where the original adds 1e-6)."""
    base = torch.log_softmax(base_logits.double(), dim=-1)
    edited = torch.log_softmax(edited_logits.double(), dim=-1)
    return (base.exp() * (base - edited)).sum(-1)


def _chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


def _over_passes(units: list[Any], run: Any, desc: str) -> list[torch.Tensor]:
    """`run(unit)` → [copies, B] for each unit (a fixed batch of prompts and candidates), split across ranks."""
    return map_fixed_batches(len(units), 1, lambda picked: [run(units[i]) for i in picked], desc=desc)


def length_batches(tokenizer: Any, prompts: Sequence[str], size: int) -> list[list[str]]:
    """Batches of prompts of similar length (sorted by token count, ties in prompt order): less padding to run."""
    lengths = [len(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda index: (lengths[index], index))
    return [[prompts[index] for index in order[start:start + size]] for start in range(0, len(order), size)]


class _Baseline:
    """Each validation batch's unedited run, on every rank: the harmful batches' refusal scores, the harmless
    batches' logits (for the KL) and block inputs (an addition at layer l reruns layers l.. only)."""

    def __init__(self, model: nn.Module, tokenizer: Any, batches: Mapping[str, list[list[str]]], refusal: Any,
                 cache_inputs: bool) -> None:
        device = model_device(model)
        self.inputs = {name: [encode(tokenizer, batch, device) for batch in found] for name, found in batches.items()}
        self.refusal = [refusal.compute(last_logits(model, inputs), None) for inputs in self.inputs["harmful"]]
        self.logits, self.layer_inputs = [], []
        for inputs in self.inputs["harmless"]:
            captured: dict[int, torch.Tensor] = {}
            with Hooks() as recorder:
                for index, block in enumerate(decoder_layers(model) if cache_inputs else []):
                    recorder.on_input(block, lambda _m, args, kwargs, index=index: captured.__setitem__(
                        index, (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
                self.logits.append(last_logits(model, inputs))
            self.layer_inputs.append(captured)
        self.harmless_refusal = [refusal.compute(logits, None) for logits in self.logits]


def _from_layer(model: nn.Module, baseline: _Baseline, batch: int, start: int, copies: int) -> torch.Tensor:
    """The last-position logits of harmless batch `batch` rerun from block `start` (its cached input)."""
    inputs = baseline.inputs["harmless"][batch]
    if start == 0 or not baseline.layer_inputs[batch]:
        return last_logits(model, inputs, copies)
    hidden = baseline.layer_inputs[batch][start].repeat(copies, 1, 1)
    with torch.no_grad(), layers_from(model, start):
        return model(inputs_embeds=hidden, attention_mask=inputs["attention_mask"].repeat(copies, 1),
                     position_ids=inputs["position_ids"].repeat(copies, 1), use_cache=False,
                     logits_to_keep=1).logits[:, -1].float()


def score_candidates(model: nn.Module, tokenizer: Any, candidates: Candidates, harmful: Sequence[str],
                     harmless: Sequence[str], refusal: Any, config: SelectionConfig) -> list[CandidateScore]:
    """Bypass, induce and KL of every candidate, in (position, layer) order. A zero candidate (layer 0: the
    template tokens' embeddings are the same in every prompt) changes nothing: it scores the baseline."""
    n_layers = candidates.directions.shape[1]
    keys = [(position, layer) for position in candidates.positions for layer in range(n_layers)]
    raw = torch.stack([candidates.at(position, layer) for position, layer in keys]).float()
    batches = {name: length_batches(tokenizer, prompts, config.batch_size)
               for name, prompts in (("harmful", harmful), ("harmless", harmless))}
    baseline = _Baseline(model, tokenizer, batches, refusal, cache_inputs=not is_zero3_partitioned(model))
    live = [index for index in range(len(keys)) if bool(raw[index].norm() > 0)]
    ablated = _chunks(live, config.candidates_per_pass)
    added = _chunks(sorted(live, key=lambda index: (keys[index][1], index)), config.candidates_per_pass)

    def bypass(unit: tuple[int, int]) -> torch.Tensor:
        chunk, inputs = ablated[unit[0]], baseline.inputs["harmful"][unit[1]]
        with hooks.ablation(model, raw[chunk]):
            return refusal.compute(last_logits(model, inputs, len(chunk)), None).view(len(chunk), -1)

    def kl(unit: tuple[int, int]) -> torch.Tensor:
        chunk, inputs = ablated[unit[0]], baseline.inputs["harmless"][unit[1]]
        with hooks.ablation(model, raw[chunk]):
            edited = last_logits(model, inputs, len(chunk))
        return kl_divergence(baseline.logits[unit[1]].repeat(len(chunk), 1), edited).view(len(chunk), -1)

    def induce(unit: tuple[int, int]) -> torch.Tensor:
        chunk = added[unit[0]]
        layers = [keys[index][1] for index in chunk]
        with hooks.addition(model, raw[chunk], layers):
            logits = _from_layer(model, baseline, unit[1], min(layers), len(chunk))
        return refusal.compute(logits, None).view(len(chunk), -1)

    runs = (("bypass", bypass, ablated, "harmful", baseline.refusal),
            ("kl", kl, ablated, "harmless", [torch.zeros_like(scores) for scores in baseline.harmless_refusal]),
            ("induce", induce, added, "harmless", baseline.harmless_refusal))
    scores = {}
    for name, run, chunks, prompts, unedited in runs:
        n_batches = len(batches[prompts])
        units = [(chunk, batch) for chunk in range(len(chunks)) for batch in range(n_batches)]
        per_unit = _over_passes(units, run, desc=f"selection: {name}")
        rows = {index: torch.cat(unedited).double() for index in range(len(keys))}  # zero candidates: unedited
        for chunk_index, chunk in enumerate(chunks):
            found = torch.cat([per_unit[chunk_index * n_batches + batch] for batch in range(n_batches)], dim=1)
            rows.update({index: found[offset].double() for offset, index in enumerate(chunk)})
        scores[name] = [float(rows[index].mean()) for index in range(len(keys))]
    return [CandidateScore(position, layer, scores["bypass"][i], scores["induce"][i], scores["kl"][i])
            for i, (position, layer) in enumerate(keys)]


def discard_reason(score: CandidateScore, n_layers: int, config: SelectionConfig) -> str | None:
    """The original's filter, in its order."""
    if any(math.isnan(value) for value in (score.refusal_score, score.steering_score, score.kl_div_score)):
        return "NaN score"
    if score.layer >= int(n_layers * (1.0 - config.prune_layer_fraction)):
        return f"layer >= {int(n_layers * (1.0 - config.prune_layer_fraction))}"
    if score.kl_div_score > config.kl_threshold:
        return f"KL > {config.kl_threshold:g}"
    if score.steering_score < config.induce_threshold:
        return f"induce < {config.induce_threshold:g}"
    return None


def fallback_candidates(scores: Sequence[CandidateScore], n_layers: int,
                        config: SelectionConfig) -> list[CandidateScore]:
    """The candidates `when_all_discarded` chooses among once the filter has kept none."""
    finite = [score for score in scores if not math.isnan(score.refusal_score) and not math.isnan(score.kl_div_score)]
    if config.when_all_discarded == "lowest_bypass":
        return finite
    if config.when_all_discarded == "kl_bounded":
        last_layer = int(n_layers * (1.0 - config.prune_layer_fraction))
        bound = max(config.kl_threshold, config.fallback_kl_threshold)
        return [score for score in finite if score.layer < last_layer and score.kl_div_score <= bound]
    return []


def select(scores: Sequence[CandidateScore], n_layers: int, config: SelectionConfig) -> tuple[CandidateScore, str]:
    """The kept candidate of lowest bypass score (the first in (position, layer) order on a tie) and how it was
    chosen ("filter"); when the filter keeps none, the lowest bypass among the fallback's candidates (its
    `discarded` says why the filter refused it), or an error."""
    for score in scores:
        score.discarded = discard_reason(score, n_layers, config)
    kept, chosen_by = [score for score in scores if score.discarded is None], "filter"
    if not kept:
        kept, chosen_by = fallback_candidates(scores, n_layers, config), config.when_all_discarded
    if not kept:
        reasons: dict[str, int] = {}
        for score in scores:
            reasons[score.discarded] = reasons.get(score.discarded, 0) + 1
        counted = ", ".join(f"{count} for {why}" for why, count in reasons.items())
        fallback = (f"; none has KL <= --fallback-kl-threshold {config.fallback_kl_threshold:g} either"
                    if config.when_all_discarded == "kl_bounded" else "")
        raise SafeneuronsError(f"the filter discarded all {len(scores)} candidates ({counted}){fallback}: loosen "
                               f"--kl-threshold, --induce-threshold or --prune-layer-fraction")
    return min(kept, key=lambda score: score.refusal_score), chosen_by


def evaluations_json(scores: Sequence[CandidateScore]) -> list[dict]:
    return [asdict(score) for score in scores]
