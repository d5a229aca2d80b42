"""Are the neurons our scores select the ones that carry refusal? For every ranking of the aligned model's MLP
neurons and every k, each layer's top k% are patched during generation (dynamic patching) from the aligned model
into its base — is refusal restored? — and from the base into the aligned model — is it removed? — next to random
neurons of the same count per layer (several seeds). Refusal on held-out harmful prompts, by the keyword judge,
with Wilson intervals; rankings overlap as Jaccard indexes. Sets are per layer, not global: every ranking and the
random control patch the same number of neurons in every layer."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.neurons.rankings import WEIGHT_METHODS, set_difference, weight_ranking
from safeneurons.models.loading import ModelSource

log = logging.getLogger(__name__)

RANKINGS = ("wandg", "wanda", "setdiff", "contrast")
RANDOM = "random"
DEFAULT_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
# direction -> (the model that generates, the model its neurons' values come from)
DIRECTIONS = {"restore": ("base", "chat"), "remove": ("chat", "base")}
DIRECTION_TITLES = {"restore": "refusal restored in the base (its neurons take the aligned model's values)",
                    "remove": "refusal removed from the aligned model (its neurons take the base's values)"}
REPORT_FILE = "neuron_patching.json"
FIGURE_FILE = "neuron_patching.png"


@dataclass
class NeuronStudyConfig:
    prompts: str = "advbench"  # held-out harmful prompts, judged
    limit: int = 100
    safety_data: str = "align"  # the weight scores' data; its prompts are the activation contrast's
    utility_data: str = "alpaca_cleaned_no_safety"
    nsamples: int = 128  # samples of the weight scores and prompts of the activation contrast
    setdiff_method: str = "wandg"
    setdiff_p: float = 0.1  # setdiff: each layer's top-p utility neurons go last
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    rankings: tuple[str, ...] = RANKINGS
    random_seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 64
    batch_size: int = 16
    score_batch_size: int = 1
    max_length: int = 512
    seed: int = 0
    data_dir: str | None = None
    add_eos: bool = False

    def validate(self) -> None:
        for name in ("limit", "nsamples", "max_new_tokens", "batch_size", "score_batch_size"):
            if getattr(self, name) < 1:
                raise SafeneuronsError(f"{name.replace('_', '-')}={getattr(self, name)} must be a positive integer")
        if not self.fractions or any(not 0 < k <= 1 for k in self.fractions):
            raise SafeneuronsError(f"neuron fractions {self.fractions}: expected fractions in (0, 1], e.g. 0.01,0.05")
        unknown = [name for name in self.rankings if name not in RANKINGS]
        if unknown or not self.rankings:
            raise SafeneuronsError(f"ranking {unknown[0] if unknown else '(none)'!r} is not one of "
                                   f"{', '.join(RANKINGS)}")
        if not self.random_seeds or len(set(self.random_seeds)) != len(self.random_seeds):
            raise SafeneuronsError(f"random seeds {self.random_seeds}: give at least one, each once")
        if self.setdiff_method not in WEIGHT_METHODS:
            raise SafeneuronsError(f"setdiff method {self.setdiff_method!r} is not one of {', '.join(WEIGHT_METHODS)}")
        if not 0 < self.setdiff_p <= 1:
            raise SafeneuronsError(f"setdiff p={self.setdiff_p} must lie in (0, 1]")

    def check_inputs(self, chat: ModelSource, base: ModelSource) -> None:
        """Before any weight loads: the data, and that the two models have the same structure (configs only)."""
        from safeneurons.data.readers import check_sources
        from safeneurons.models.loading import load_config
        from safeneurons.models.structure import check_same_config

        self.validate()
        check_sources(self.prompts, self.safety_data, self.utility_data, directory=self.data_dir)
        check_same_config(load_config(chat.name, chat.cache_dir), load_config(base.name, base.cache_dir),
                          (f"aligned model {chat.name}", f"base model {base.name}"))

    def score_config(self, method: str, data: str) -> Any:
        """The `score` settings of a weight ranking (a neuron's score is the sum over its rows: no selection)."""
        from safeneurons.scores.config import ScoreConfig

        return ScoreConfig(method=method, data=data, sparsity_ratio=0.5, nsamples=self.nsamples, seed=self.seed,
                           max_length=self.max_length, data_dir=self.data_dir, batch_size=self.score_batch_size,
                           add_eos=self.add_eos)


@dataclass
class NeuronStudyResult:
    """What neuron_patching.json holds: the settings, the plain models' rates, one point per (direction, ranking,
    random seed, k), random's pooled rate per (direction, k), the rankings' overlaps per k, and the cost."""

    chat_model: str
    base_model: str
    config: dict
    plain: dict[str, dict]  # "chat" / "base" -> the unpatched model's rates
    points: list[dict]
    random_pooled: list[dict]
    overlaps: dict[str, dict[str, float]]  # k -> "a|b" -> Jaccard
    seconds_per_prompt: dict[str, float]
    verdict: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def rate_record(generations: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Refusal rate and ASR (keyword judge) of greedy generations, with Wilson intervals."""
    from safeneurons.evaluation.metrics import is_attack_success, is_refusal, wilson_interval

    texts = [options[0] for options in generations]
    refused, attacked = sum(map(is_refusal, texts)), sum(map(is_attack_success, texts))
    return {"n_prompts": len(texts), "refusal_rate": refused / len(texts),
            "refusal_interval": list(wilson_interval(refused, len(texts))), "asr": attacked / len(texts),
            "asr_interval": list(wilson_interval(attacked, len(texts)))}


def rate_text(entry: dict) -> str:
    low, high = entry["refusal_interval"]
    return f"{entry['refusal_rate']:.2f} [{low:.2f}, {high:.2f}]"


def percent(k: float) -> str:
    return f"{k * 100:g}%"


def ranked_point(result: NeuronStudyResult, direction: str, ranking: str, k: float) -> dict:
    return next(point for point in result.points if point["direction"] == direction and point["ranking"] == ranking
                and point["fraction"] == k)


def random_point(result: NeuronStudyResult, direction: str, k: float) -> dict:
    return next(entry for entry in result.random_pooled if entry["direction"] == direction and entry["fraction"] == k)


def beats_random(point: dict, random: dict, direction: str) -> bool:
    """The ranking's interval lies wholly on the better side of random's pooled interval (above it when
    restoring refusal, below it when removing it)."""
    if direction == "restore":
        return point["refusal_interval"][0] > random["refusal_interval"][1]
    return point["refusal_interval"][1] < random["refusal_interval"][0]


def verdict_lines(result: NeuronStudyResult) -> list[str]:
    """One sentence per direction and ranking, quoting the intervals; "no better than random" when no k separates
    it from the random control."""
    fractions = result.config["fractions"]
    lines = []
    for direction in DIRECTIONS:
        plain = f"plain base {rate_text(result.plain['base'])}, plain aligned model {rate_text(result.plain['chat'])}"
        lines.append(f"{DIRECTION_TITLES[direction].capitalize()} ({plain}; refusal rate [95% Wilson interval], "
                     f"random pooled over {len(result.config['random_seeds'])} seeds):")
        for ranking in result.config["rankings"]:
            wins = [k for k in fractions if beats_random(ranked_point(result, direction, ranking, k),
                                                         random_point(result, direction, k), direction)]
            k = wins[-1] if wins else fractions[-1]
            quoted = (f"at k = {percent(k)}: {rate_text(ranked_point(result, direction, ranking, k))} vs random "
                      f"{rate_text(random_point(result, direction, k))}")
            if wins:
                lines.append(f"- {ranking} is better than random at k = {', '.join(map(percent, wins))} ({quoted}).")
            else:
                lines.append(f"- {ranking} is no better than random at any k ({quoted}).")
    return lines


def rankings_of(chat: Any, base: Any, tokenizer: Any, config: NeuronStudyConfig) -> dict[str, dict[int, torch.Tensor]]:
    """Collective: every requested ranking of the aligned model's neurons, on every rank."""
    from safeneurons.data.samples import load_prompts
    from safeneurons.evaluation.generation import Decoding
    from safeneurons.interp.neurons.contrast import activation_contrast

    wanted = set(config.rankings)
    methods = {method for method in WEIGHT_METHODS if method in wanted}
    if "setdiff" in wanted:
        methods.add(config.setdiff_method)
    ranked = {method: weight_ranking(chat, tokenizer, config.score_config(method, config.safety_data))
              for method in sorted(methods)}
    if "setdiff" in wanted:
        utility = weight_ranking(chat, tokenizer, config.score_config(config.setdiff_method, config.utility_data))
        ranked["setdiff"] = set_difference(ranked[config.setdiff_method], utility, config.setdiff_p)
    if "contrast" in wanted:
        prompts = load_prompts(config.safety_data, tokenizer, config.nsamples, config.data_dir)
        ranked["contrast"] = activation_contrast(chat, base, tokenizer, prompts,
                                                 Decoding(max_new_tokens=config.max_new_tokens), config.batch_size)
    return {name: ranked[name] for name in config.rankings}


def neuron_sets(rankings: Mapping[str, Mapping[int, torch.Tensor]], config: NeuronStudyConfig,
                width: int | Mapping[int, int]) -> dict[tuple[str, int | None, float], dict[int, list[int]]]:
    """(ranking, random seed or None, k) -> the neurons patched: each layer's top k of a ranking, or as many random
    neurons per layer (seeded by the seed and k's position)."""
    from safeneurons.masks.neurons import random_like, top_fraction

    sets = {}
    for position, k in enumerate(config.fractions):
        for name, scores in rankings.items():
            sets[(name, None, k)] = top_fraction(scores, k)
        reference = sets[(next(iter(rankings)), None, k)]
        for seed in config.random_seeds:
            sets[(RANDOM, seed, k)] = random_like(reference, width, seed * 1000 + position)
    return sets


def overlaps(sets: Mapping[tuple[str, int | None, float], Mapping[int, Sequence[int]]],
             config: NeuronStudyConfig) -> dict[str, dict[str, float]]:
    """Per k, the Jaccard index of every two rankings' sets, and of each ranking with the first random seed's."""
    from safeneurons.masks.neurons import jaccard

    names = [*config.rankings, RANDOM]
    found = {}
    for k in config.fractions:
        chosen = {name: sets[(name, config.random_seeds[0] if name == RANDOM else None, k)] for name in names}
        found[f"{k:g}"] = {f"{a}|{b}": jaccard(chosen[a], chosen[b]) for i, a in enumerate(names)
                           for b in names[i + 1:]}
    return found


def pooled_random(points: Sequence[dict], config: NeuronStudyConfig) -> list[dict]:
    """Per (direction, k), the random seeds' generations pooled: one rate over seeds × prompts, with its interval,
    and the spread of the seeds' own rates."""
    from safeneurons.evaluation.metrics import wilson_interval

    pooled = []
    for direction in DIRECTIONS:
        for k in config.fractions:
            mine = [point for point in points if point["ranking"] == RANDOM and point["direction"] == direction
                    and point["fraction"] == k]
            n = sum(point["n_prompts"] for point in mine)
            refused = sum(round(point["refusal_rate"] * point["n_prompts"]) for point in mine)
            rates = [point["refusal_rate"] for point in mine]
            pooled.append({"direction": direction, "fraction": k, "n_prompts": n, "refusal_rate": refused / n,
                           "refusal_interval": list(wilson_interval(refused, n)), "seed_rates": rates,
                           "n_neurons": mine[0]["n_neurons"]})
    return pooled


class _Sweep:
    """Generation on the held-out prompts, plain or with neurons patched from the other model, timed."""

    def __init__(self, models: Mapping[str, Any], tokenizer: Any, prompts: Sequence[str],
                 config: NeuronStudyConfig) -> None:
        from safeneurons.evaluation.generation import Decoding

        self.models, self.tokenizer, self.prompts = models, tokenizer, list(prompts)
        self.decoding, self.batch_size = Decoding(max_new_tokens=config.max_new_tokens), config.batch_size
        self.seconds: dict[str, float] = {"plain": 0.0, "patched": 0.0}
        self.runs = {"plain": 0, "patched": 0}

    def rates(self, direction: str | None, plain_model: str = "", neurons: Mapping[int, Sequence[int]] = (),
              desc: str = "") -> dict | None:
        """Rank 0: the rates of `plain_model` alone, or of `direction`'s patched generation of `neurons`."""
        import contextlib

        from safeneurons.evaluation.generation import generate_distributed
        from safeneurons.interventions.neuron_patching import patched_neurons

        kind = "plain" if direction is None else "patched"
        patched_name, source_name = (plain_model, None) if direction is None else DIRECTIONS[direction]
        patching = (contextlib.nullcontext() if source_name is None else
                    patched_neurons(self.models[patched_name], self.models[source_name], neurons))
        started = time.perf_counter()
        with patching:
            generations = generate_distributed(self.models[patched_name], self.tokenizer, self.prompts,
                                               self.decoding, self.batch_size, desc=desc)
        self.seconds[kind] += time.perf_counter() - started
        self.runs[kind] += 1
        return None if generations is None else rate_record(generations)

    def per_prompt(self) -> dict[str, float]:
        return {kind: self.seconds[kind] / max(1, self.runs[kind]) / len(self.prompts) for kind in self.seconds}


def sweep_points(sweep: _Sweep, sets: Mapping[tuple[str, int | None, float], Mapping[int, Sequence[int]]]
                 ) -> list[dict]:
    """Every set patched in both directions; the points on rank 0 (empty elsewhere)."""
    from safeneurons.masks.neurons import count

    points = []
    for direction in DIRECTIONS:
        for (ranking, seed, k), neurons in sets.items():
            label = f"{direction} {ranking}{'' if seed is None else f' seed {seed}'} k={k:g}"
            found = sweep.rates(direction, neurons=neurons, desc=label)
            if found is not None:
                points.append({"direction": direction, "ranking": ranking, "seed": seed, "fraction": k,
                               "n_neurons": count(neurons), **found})
    return points


def study_neurons(chat: Any, base: Any, tokenizer: Any, config: NeuronStudyConfig,
                  names: tuple[str, str] = ("chat", "base")) -> NeuronStudyResult | None:
    """Collective, on loaded models (the aligned `chat` and its `base`): rankings, sets, both directions of
    patching at every k, the random control; the result on rank 0."""
    from safeneurons.data.samples import load_prompts
    from safeneurons.models.hooks import output_width, site_point
    from safeneurons.models.structure import decoder_layers
    from safeneurons.runtime import distributed

    config.validate()
    rankings = rankings_of(chat, base, tokenizer, config)
    sets = neuron_sets(rankings, config, {layer: output_width(site_point(chat, layer, "mlp_neuron"))
                                          for layer in range(len(decoder_layers(chat)))})
    prompts = load_prompts(config.prompts, tokenizer, config.limit, config.data_dir)
    sweep = _Sweep({"chat": chat, "base": base}, tokenizer, prompts, config)
    plain = {name: sweep.rates(None, plain_model=name, desc=f"plain {name}") for name in ("chat", "base")}
    points = sweep_points(sweep, sets)
    if not distributed.is_main():
        return None
    result = NeuronStudyResult(names[0], names[1], asdict(config), plain, points, pooled_random(points, config),
                               overlaps(sets, config), sweep.per_prompt())
    result.verdict = verdict_lines(result)
    return result
