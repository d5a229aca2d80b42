"""`circuit` as one call: score every edge of the graph on pairs of harmful (clean) and harmless (corrupted)
prompts, patch the top edges exactly, build circuits at every size with their faithfulness against random ones,
and write circuit.json, circuit.png, faithfulness.png and report.txt.

Pairs are split across ranks; every per-pair value is computed the same way on any rank and the values are summed
in pair order, so 2 ranks give the 1-rank result bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from safeneurons.data.readers import check_sources
from safeneurons.data.samples import load_prompts
from safeneurons.errors import SafeneuronsError
from safeneurons.evaluation.metrics import SUBSTRING_JUDGES
from safeneurons.interp.circuits.analysis import CircuitResult, PairValues, pair_mean, summarize
from safeneurons.interp.circuits.faithfulness import FRACTIONS, circuit_sizes, random_circuit, top_circuit
from safeneurons.interp.circuits.graph import CircuitGraph, check_layout
from safeneurons.interp.circuits.pairs import ALIGNMENTS, PairAlignment, align_pair
from safeneurons.interp.circuits.removal import removal_study
from safeneurons.interp.circuits.report import publish
from safeneurons.interp.circuits.sharded import ShardedPairs, stage_recorder
from safeneurons.interp.circuits.scores import (PreparedPair, attribution_scores, circuit_metrics,
                                                exact_edge_effects, prepare_pair)
from safeneurons.interp.patching.metrics import Metric, metric_named
from safeneurons.interp.patching.sites import METRICS, REFUSAL_STARTS
from safeneurons.masks.io import check_mask_file_fits, load_masks
from safeneurons.models.blocks import block_of, load_source
from safeneurons.models.loading import ModelSource, load_tokenizer, model_skeleton
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import check_output_dir

EXACT = ("none", "top", "all")
RANKINGS = ("eap-ig", "eap")
SELECTIONS = ("top", "greedy")


@dataclass(frozen=True)
class CircuitConfig:
    harmful: str = "demo-harmful"  # the clean prompts (the model refuses them)
    harmless: str = "demo-harmless"  # the corrupted prompts, paired with the harmful ones in order
    n_pairs: int = 8
    data_dir: str | None = None
    alignment: str = "template"  # pairs.ALIGNMENTS
    ig_steps: int = 5
    metric: str = "refusal"
    tokens: tuple[str, str] | None = None  # logit_diff: logit(A) − logit(B)
    direction: str | None = None  # the direction metric's file
    refusal_starts: tuple[str, ...] = REFUSAL_STARTS
    ranking: str = "eap-ig"  # the scores the circuits are chosen by
    selection: str = "top"  # top-n by |score|, or the greedy search from the logits
    exact: str = "top"  # edges patched exactly: none, the ranking's top_k, or all
    top_k: int = 50
    fractions: tuple[float, ...] = FRACTIONS
    random_seeds: int = 3
    circuit_size: int | None = None  # edges of the circuit written and drawn (None: the smallest keeping 80%)
    masks: str | None = None  # compare the circuit's nodes with these safety-critical weights
    batch_size: int = 16  # patched rows (circuits or edges) per forward pass
    removal_prompts: int = 16  # held-out harmful prompts answered with the circuit removed (0: none)
    max_new_tokens: int = 32
    judge: str = "keyword"  # evaluation.metrics.SUBSTRING_JUDGES

    def validate(self) -> None:
        for value, allowed, option in ((self.alignment, ALIGNMENTS, "--alignment"), (self.metric, METRICS, "--metric"),
                                       (self.ranking, RANKINGS, "--ranking"), (self.exact, EXACT, "--exact"),
                                       (self.selection, SELECTIONS, "--selection")):
            if value not in allowed:
                raise SafeneuronsError(f"{option} {value!r} is not one of {', '.join(allowed)}")
        if self.judge not in SUBSTRING_JUDGES:
            raise SafeneuronsError(f"--judge {self.judge!r} is not one of {', '.join(SUBSTRING_JUDGES)}")
        if self.removal_prompts < 0:
            raise SafeneuronsError(f"--removal-prompts {self.removal_prompts} must be >= 0")
        for name in ("n_pairs", "top_k", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise SafeneuronsError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a positive integer")
        if self.ig_steps < 1:
            raise SafeneuronsError(f"--ig-steps {self.ig_steps} must be a positive integer (1 step is EAP)")
        if self.random_seeds < 1:
            raise SafeneuronsError(f"--random-seeds {self.random_seeds} must be >= 1 (the random circuits are the "
                                   f"control band)")
        if not self.fractions or any(not 0 < fraction <= 1 for fraction in self.fractions) \
                or list(self.fractions) != sorted(set(self.fractions)):
            raise SafeneuronsError(f"--fractions {list(self.fractions)}: expected increasing fractions in (0, 1]")
        if self.metric == "logit_diff" and not self.tokens:
            raise SafeneuronsError("--metric logit_diff needs --tokens A B (two one-token texts)")
        if self.metric == "direction" and not self.direction:
            raise SafeneuronsError("--metric direction needs --direction FILE (a refusal direction file)")

    def check_inputs(self) -> None:
        """The files the study reads exist (before any model loads)."""
        if self.metric == "direction" and not Path(self.direction).is_file():
            raise SafeneuronsError(f"--direction {self.direction} does not exist (a refusal direction file from "
                                   f"`safeneurons direction`)")
        if self.masks is not None and not Path(self.masks).exists():
            raise SafeneuronsError(f"--masks {self.masks} does not exist (a mask file or folder from `score`)")
        check_sources(self.harmful, self.harmless, directory=self.data_dir)

    def ranked(self, eap: torch.Tensor, eap_ig: torch.Tensor) -> torch.Tensor:
        """The scores `ranking` chooses the circuits by."""
        return eap_ig if self.ranking == "eap-ig" else eap

    def check_graph(self, graph: CircuitGraph) -> None:
        if self.circuit_size is not None:
            graph.check_size(self.circuit_size, "--circuit-size")
        if self.exact == "top":
            graph.check_size(self.top_k, "--top-k")


def check_model(model: ModelSource, config: CircuitConfig) -> CircuitGraph:
    """The model's layout and the graph's sizes, from its config alone (before any weight is read)."""
    if model.deepspeed is not None:
        raise SafeneuronsError("circuit runs on whole models split across ranks by pairs, or layer-sharded "
                               "(--shard layers); --deepspeed (ZeRO-3) is not supported by this command")
    skeleton = model_skeleton(model.name, model.cache_dir)
    check_layout(skeleton, model.name)
    graph = CircuitGraph.of(skeleton)
    config.check_graph(graph)
    return graph


def tokenized_pairs(tokenizer: Any, config: CircuitConfig) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                                     list[PairAlignment]]:
    """The (clean, corrupted) input ids of every pair and their alignments (an error names a pair that does not
    align)."""
    harmful = load_prompts(config.harmful, tokenizer, config.n_pairs, config.data_dir)
    harmless = load_prompts(config.harmless, tokenizer, config.n_pairs, config.data_dir)
    if min(len(harmful), len(harmless)) < config.n_pairs:
        raise SafeneuronsError(f"--n-pairs {config.n_pairs}: {config.harmful} has {len(harmful)} prompts and "
                               f"{config.harmless} {len(harmless)}")
    pairs = [(tokenizer(clean, return_tensors="pt")["input_ids"], tokenizer(corrupt, return_tensors="pt")["input_ids"])
             for clean, corrupt in zip(harmful, harmless)]
    return pairs, [align_pair(clean[0].tolist(), corrupt[0].tolist(), config.alignment, index)
                   for index, (clean, corrupt) in enumerate(pairs)]


def held_out_prompts(tokenizer: Any, config: CircuitConfig) -> list[str]:
    """The harmful prompts after the pairs' (at most `removal_prompts`), answered with the circuit removed."""
    if not config.removal_prompts:
        return []
    prompts = load_prompts(config.harmful, tokenizer, config.n_pairs + config.removal_prompts,
                           config.data_dir)[config.n_pairs:]
    if not prompts:
        raise SafeneuronsError(f"--removal-prompts {config.removal_prompts}: {config.harmful} has no prompt left after "
                               f"the {config.n_pairs} pairs' (use fewer --n-pairs, or --removal-prompts 0)")
    return prompts


def over_pairs(pairs: Sequence[int], compute: Callable[[int], Any]) -> dict[int, list[Any]]:
    """`compute(pair)` for this rank's `pairs`; every rank's values of every pair (one per rank that computed it:
    one, or each stage of a layer-sharded pipeline), on every rank."""
    local = {index: compute(index) for index in distributed.progress(pairs, desc="pairs")}
    merged: dict[int, list[Any]] = {}
    for part in distributed.all_gather(local):
        for index, value in part.items():
            merged.setdefault(index, []).append(value)
    return merged


class WholePairs:
    """The pairs' computations on a model every rank holds whole: ranks split the pairs."""

    def __init__(self, model: torch.nn.Module, graph: CircuitGraph, metric: Metric,
                 pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], config: CircuitConfig) -> None:
        self.model, self.graph, self.metric, self.pairs, self.config = model, graph, metric, pairs, config
        self.device = next(model.parameters()).device
        self.prepared: dict[int, PreparedPair] = {}

    def mine(self) -> list[int]:
        return distributed.assign_round_robin(len(self.pairs))

    def prepare(self, index: int) -> PreparedPair:
        if index not in self.prepared:
            clean, corrupted = (ids.to(self.device) for ids in self.pairs[index])
            self.prepared[index] = prepare_pair(self.model, self.metric, index, clean, corrupted,
                                                self.config.alignment)
        return self.prepared[index]

    def score(self, index: int) -> PairValues:
        model, graph, metric, pair = self.model, self.graph, self.metric, self.prepare(index)
        empty = torch.zeros_like(graph.adjacency())
        return PairValues(attribution_scores(model, graph, metric, pair, 0),
                          attribution_scores(model, graph, metric, pair, self.config.ig_steps), pair.clean_metric,
                          pair.corrupted_metric, circuit_metrics(model, graph, metric, pair, [empty], 1)[0])

    def measure(self, index: int, edges: Sequence[tuple[int, int]],
                circuits: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
        pair, size = self.prepare(index), self.config.batch_size
        return (exact_edge_effects(self.model, self.graph, self.metric, pair, edges, size),
                circuit_metrics(self.model, self.graph, self.metric, pair, circuits, size))

    @staticmethod
    def combine_scores(parts: Sequence[PairValues]) -> PairValues:
        return parts[0]

    @staticmethod
    def combine_measures(parts: Sequence[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
        return parts[0]


def chosen_circuits(graph: CircuitGraph, scores: torch.Tensor, config: CircuitConfig,
                    sizes: Sequence[int]) -> torch.Tensor:
    """[sizes, receivers, nodes] the circuit of each size by `config.selection`, on input-to-logits paths."""
    if config.selection == "greedy":
        return torch.stack([graph.on_paths(graph.greedy(scores, size)) for size in sizes])
    return torch.stack([top_circuit(graph, scores, size) for size in sizes])


def circuit_masks(graph: CircuitGraph, config: CircuitConfig, eap: torch.Tensor,
                  eap_ig: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every circuit whose metric phase 2 measures, by name: `eap`/`eap-ig` ([sizes, receivers, nodes]), `random`
    ([seeds · sizes, …]), `nodes` (node-level attribution's top nodes with every edge between them)."""
    sizes = circuit_sizes(graph.n_edges, config.fractions)
    circuits = {"eap-ig": chosen_circuits(graph, eap_ig, config, sizes),
                "eap": chosen_circuits(graph, eap, config, sizes),
                "random": torch.stack([random_circuit(graph, size, seed) for seed in range(config.random_seeds)
                                       for size in sizes])}
    node_scores = config.ranked(eap, eap_ig).sum(0).abs()  # = node-level attribution
    node_scores[0] = -1.0  # the input is always in
    nodes = []
    for count in sorted({max(1, round(fraction * (graph.n_nodes - 1))) for fraction in config.fractions}):
        chosen = torch.zeros(graph.n_nodes, dtype=torch.bool)
        chosen[torch.argsort(node_scores, descending=True, stable=True)[:count]] = True
        nodes.append(graph.node_circuit(chosen))
    circuits["nodes"] = torch.stack(nodes)
    if config.circuit_size is not None:
        circuits["chosen"] = chosen_circuits(graph, config.ranked(eap, eap_ig), config, [config.circuit_size])
    return circuits


def exact_edges(graph: CircuitGraph, config: CircuitConfig, ranking: torch.Tensor) -> list[tuple[int, int]]:
    if config.exact == "none":
        return []
    edges = graph.adjacency().nonzero()
    if config.exact == "top":
        order = torch.argsort(ranking[edges[:, 0], edges[:, 1]].abs(), descending=True, stable=True)
        edges = edges[order[:config.top_k]]
    return [tuple(edge) for edge in edges.tolist()]


def run_circuit(model: ModelSource, config: CircuitConfig, out: str | Path) -> CircuitResult | None:
    """Collective: the circuit study, written to `out` by rank 0; its result on rank 0, None elsewhere."""
    config.validate()
    config.check_inputs()
    check_output_dir(out)
    model.check()
    graph = check_model(model, config)
    if config.masks is not None:
        check_mask_file_fits(config.masks, model.name, model.cache_dir)
    tokenizer = load_tokenizer(model.name, model.cache_dir)
    pairs, alignments = tokenized_pairs(tokenizer, config)  # a pair that does not align fails before the model loads
    held_out = held_out_prompts(tokenizer, config)
    metric = metric_named(config.metric, tokenizer, config.tokens, config.direction, config.refusal_starts)
    context = distributed.init_distributed(require_process_group=model.shard != "none")
    loaded = load_source(model, context.device)
    print_main(f"circuit graph: {graph.n_nodes} nodes, {graph.n_receivers} receivers, {graph.n_edges} edges; "
               f"{len(pairs)} pairs")
    result = study_circuit(loaded.model, graph, metric, pairs, config, model.name)
    result.alignments = [alignment.to_dict() for alignment in alignments]
    if held_out:
        chosen = set(result.circuit["nodes"])
        nodes = torch.tensor([name in chosen for name in graph.node_names()])
        device = next(loaded.model.parameters()).device
        result.removal = removal_study(loaded.model, tokenizer, graph, nodes, held_out,
                                       [corrupted.to(device) for _, corrupted in pairs], config.random_seeds,
                                       config.max_new_tokens, config.batch_size, config.judge,
                                       stage_recorder(loaded.model, graph, metric))
    if not distributed.is_main():
        return None
    publish(result, graph, out)
    return result


def study_circuit(model: torch.nn.Module, graph: CircuitGraph, metric: Metric,
                  pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], config: CircuitConfig,
                  name: str) -> CircuitResult:
    """Collective: every pair's edge scores (split across ranks), the circuits and exact edges they choose, every
    pair's metrics of those, and the result (on every rank)."""
    block = block_of(model)
    runner = (WholePairs if block is None else ShardedPairs)(model, graph, metric, pairs, config)
    scored = over_pairs(runner.mine(), runner.score)
    first = [runner.combine_scores(scored[index]) for index in range(len(pairs))]
    eap, eap_ig = pair_mean([values.eap for values in first]), pair_mean([values.eap_ig for values in first])
    circuits = circuit_masks(graph, config, eap, eap_ig)
    stacked = [mask for masks in circuits.values() for mask in masks]
    edges = exact_edges(graph, config, config.ranked(eap, eap_ig))
    measured = over_pairs(runner.mine(), lambda index: runner.measure(index, edges, stacked))
    second = [runner.combine_measures(measured[index]) for index in range(len(pairs))]
    exact = pair_mean([values[0] for values in second]) if edges else []
    return summarize(graph, config, first, eap, eap_ig, circuits, pair_mean([values[1] for values in second]),
                     edges, exact, name, None if config.masks is None else load_masks(config.masks))


def print_main(text: str) -> None:
    if distributed.is_main():
        print(text, flush=True)
