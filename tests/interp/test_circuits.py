"""Edge-level circuits: the graph's counts, the identities of edge patching (no edge = clean, every edge =
corrupted), EAP as the first order of exact edge patching, EAP-IG with one step = EAP, a node's edges summing to
its node-level attribution, k/v edges under grouped-query attention against a reference with its own hooks, the
alignment of prompts of different lengths, and the command on 1 and 2 ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import MOE_FAMILIES, make_tiny_llama, run_expecting_error, run_ranks, tiny_model, tiny_moe
from safeneurons import cli
from safeneurons.data.samples import format_prompt
from safeneurons.errors import SafeneuronsError
from safeneurons.interp.circuits.faithfulness import top_circuit
from safeneurons.interp.circuits.graph import CircuitGraph, check_layout
from safeneurons.interp.circuits.pairs import align_pair
from safeneurons.interp.circuits.scores import (attribution_scores, circuit_metrics, exact_edge_effects,
                                                prepare_pair)
from safeneurons.interp.patching.metrics import Metric
from safeneurons.interp.patching.patcher import ActivationPatcher
from safeneurons.interp.patching.sites import PatchingSite

LAYERS, HEADS, KV_HEADS = 3, 4, 2
# A float64 metric: in float64 the model's own float32 norms bound how small a corruption still resolves
LOGIT_DIFF = Metric("logit_diff", lambda logits, _residual: logits[:, 5] - logits[:, 7])


@pytest.fixture(scope="module")
def gqa(demo_tokenizer):
    return make_tiny_llama(demo_tokenizer, seed=3, layers=LAYERS, hidden=32, heads=HEADS, kv_heads=KV_HEADS).double()


@pytest.fixture(scope="module")
def ids(gqa):
    """A clean and a corrupted prompt of 9 random tokens each."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randint(3, gqa.config.vocab_size, (1, 9), generator=generator) for _ in range(2))


@pytest.fixture(scope="module")
def pair(gqa, ids):
    return prepare_pair(gqa, LOGIT_DIFF, 0, *ids, "equal")


def reference_edges(layers: int, heads: int, kv_heads: int) -> list[str]:
    """Every edge by the definition: a node writes before a receiver reads (attention reads the layers before it,
    the MLP its own layer's heads too, the logits everything)."""
    nodes = [("input", -1)] + [(f"L{layer}.attn_head.h{h}", 2 * layer) for layer in range(layers)
                               for h in range(heads)]
    nodes += [(f"L{layer}.mlp_out", 2 * layer + 1) for layer in range(layers)]
    receivers = [(f"L{layer}.{part}.{'h' if part == 'q' else 'g'}{i}", 2 * layer) for layer in range(layers)
                 for part, count in (("q", heads), ("k", kv_heads), ("v", kv_heads)) for i in range(count)]
    receivers += [(f"L{layer}.mlp_in", 2 * layer + 1) for layer in range(layers)] + [("logits", 2 * layers)]
    return sorted(f"{node}->{receiver}" for node, written in nodes for receiver, read in receivers if written < read)


def test_graph_has_every_edge_once_and_q_k_v_per_head_under_gqa(gqa):
    graph = CircuitGraph.of(gqa)
    assert (graph.n_nodes, graph.n_receivers) == (1 + LAYERS * (HEADS + 1), LAYERS * (HEADS + 2 * KV_HEADS + 1) + 1)
    assert sorted(graph.edge_names()) == reference_edges(LAYERS, HEADS, KV_HEADS)
    assert graph.n_edges == len(reference_edges(LAYERS, HEADS, KV_HEADS))


def test_no_edge_patched_is_the_clean_run_and_every_edge_the_corrupted_run(gqa, pair):
    graph = CircuitGraph.of(gqa)
    every, none = graph.adjacency(), torch.zeros_like(graph.adjacency())
    kept_all, kept_none = circuit_metrics(gqa, graph, LOGIT_DIFF, pair, [every, none], batch_size=2)
    assert kept_all == pair.clean_metric
    assert kept_none == pytest.approx(pair.corrupted_metric, abs=1e-6)
    assert abs(pair.clean_metric - pair.corrupted_metric) > 1e-2


def test_exact_edge_effects_over_epsilon_tend_to_eap(gqa, pair):
    """Corruption scaled by ε: exact effect / ε → EAP score, the error shrinking with ε (first order)."""
    graph = CircuitGraph.of(gqa)
    eap = attribution_scores(gqa, graph, LOGIT_DIFF, pair, 0)
    edges = [tuple(edge) for edge in graph.adjacency().nonzero().tolist()]
    estimate = torch.tensor([float(eap[edge]) for edge in edges], dtype=torch.float64)
    errors = []
    for epsilon in (1e-2, 1e-3):
        exact = torch.tensor(exact_edge_effects(gqa, graph, LOGIT_DIFF, pair, edges, 64, epsilon)) / epsilon
        errors.append(float((exact - estimate).abs().max() / estimate.abs().max()))
    assert errors[1] < errors[0] / 5 and errors[1] < 2e-3, errors


def test_eap_ig_with_one_step_is_eap_and_more_steps_differ(gqa, pair):
    graph = CircuitGraph.of(gqa)
    eap = attribution_scores(gqa, graph, LOGIT_DIFF, pair, 0)
    assert torch.equal(attribution_scores(gqa, graph, LOGIT_DIFF, pair, 1), eap)
    assert not torch.allclose(attribution_scores(gqa, graph, LOGIT_DIFF, pair, 4), eap)


def test_a_nodes_outgoing_edges_sum_to_its_node_attribution(gqa, ids, pair):
    """Σ_v score(u → v) = patch --method attribution of node u at every position (the residual is a sum)."""
    graph = CircuitGraph.of(gqa)
    sums = attribution_scores(gqa, graph, LOGIT_DIFF, pair, 0).sum(0)
    clean, corrupted = ids
    sites = [PatchingSite(layer, "attn_head", head, "all") for layer in range(LAYERS) for head in range(HEADS)]
    sites += [PatchingSite(layer, "mlp_out", None, "all") for layer in range(LAYERS)]
    result = ActivationPatcher(metric=LOGIT_DIFF).patch_sweep(gqa, clean, corrupted, sites, method="attribution")
    for effect in result.effects:
        site = effect.site
        node = graph.head_node(site.layer, site.head) if site.head is not None else graph.mlp_node(site.layer)
        assert float(sums[node]) == pytest.approx(effect.patched_metric - effect.clean_metric, rel=1e-5, abs=1e-7)


def head_contribution(model, layer, head, ids):
    """Head `head`'s output in layer `layer` (its slice of o_proj's input through o_proj), [T, D]."""
    kept = {}
    attention = model.model.layers[layer].self_attn
    handle = attention.o_proj.register_forward_pre_hook(lambda _m, args: kept.__setitem__("z", args[0][0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    width = attention.o_proj.in_features // HEADS
    columns = slice(head * width, (head + 1) * width)
    return kept["z"][:, columns] @ attention.o_proj.weight[:, columns].T


@pytest.mark.parametrize("part", ["k", "v"])
def test_key_value_edges_under_gqa_against_a_reference(gqa, ids, pair, part):
    """Edge L0 head 1 → layer 2's k (or v) of key/value head 1: the reference recomputes that key/value head's
    projection from the clean residual plus the head's corrupted-minus-clean output, with its own hooks."""
    graph = CircuitGraph.of(gqa)
    clean_ids, corrupted_ids = ids
    delta = head_contribution(gqa, 0, 1, corrupted_ids) - head_contribution(gqa, 0, 1, clean_ids)
    layer = gqa.model.layers[2]
    projection = getattr(layer.self_attn, f"{part}_proj")
    width = projection.out_features // KV_HEADS
    rows = slice(width, 2 * width)  # key/value head 1

    residual = {}

    def replace(_module, _args, output):
        patched = output.clone()
        patched[0, :, rows] = layer.input_layernorm.forward(residual["x"] + delta) @ projection.weight[rows].T
        return patched
    handles = [layer.input_layernorm.register_forward_pre_hook(lambda _m, args: residual.__setitem__("x", args[0][0])),
               projection.register_forward_hook(replace)]
    with torch.no_grad():
        logits = gqa(clean_ids).logits[:, -1]
    for handle in handles:
        handle.remove()
    receiver = graph.attention_receiver(2) + HEADS + (0 if part == "k" else KV_HEADS) + 1
    effect = exact_edge_effects(gqa, graph, LOGIT_DIFF, pair, [(receiver, graph.head_node(0, 1))], 1)[0]
    assert graph.receiver_names()[receiver] == f"L2.{part}.g1"
    assert effect + pair.clean_metric == pytest.approx(float(LOGIT_DIFF.compute(logits, None)[0]), abs=1e-9)


def test_circuits_lie_on_paths_from_the_input_to_the_logits(gqa, pair):
    graph = CircuitGraph.of(gqa)
    scores = attribution_scores(gqa, graph, LOGIT_DIFF, pair, 0)
    for size in (1, 5, 60):
        kept = top_circuit(graph, scores, size)
        assert int(kept.sum()) <= size  # the top edges that lie on no path are dropped
        assert torch.equal(graph.on_paths(kept), kept)
        greedy = graph.greedy(scores, size)
        assert int(greedy.sum()) == size and bool(greedy[graph.logits_receiver].any())
    assert bool(kept[graph.logits_receiver].any())
    dangling = torch.zeros_like(graph.adjacency())
    dangling[graph.mlp_receiver(0), 0] = True  # input -> L0 MLP, whose output reaches nothing kept
    assert not graph.on_paths(dangling).any()


def test_removal_sets_the_chosen_nodes_to_their_mean_and_nothing_else(gqa, ids):
    from safeneurons.interp.circuits.forward import record_nodes
    from safeneurons.interp.circuits.removal import ablated, mean_outputs, random_nodes

    graph = CircuitGraph.of(gqa)
    means = mean_outputs(gqa, list(ids))
    clean = ids[0]
    baseline, _ = record_nodes(gqa, clean)
    chosen = torch.zeros(graph.n_nodes, dtype=torch.bool)
    with ablated(gqa, graph, chosen, means):
        untouched, _ = record_nodes(gqa, clean)
    assert torch.equal(untouched.mlps[2], baseline.mlps[2]) and torch.equal(untouched.heads[1], baseline.heads[1])
    chosen[graph.mlp_node(1)] = chosen[graph.head_node(2, 3)] = True
    with ablated(gqa, graph, chosen, means):
        removed, _ = record_nodes(gqa, clean)
    width = gqa.config.hidden_size // HEADS
    assert torch.equal(removed.mlps[1], means.mlps[1].expand_as(removed.mlps[1]))
    assert torch.equal(removed.heads[2][:, 3 * width:], means.heads[2][:, 3 * width:].expand(9, -1))
    assert torch.equal(removed.heads[1], baseline.heads[1])  # upstream of what was removed
    control = random_nodes(graph, chosen, seed=0)
    assert int(control.sum()) == 2 and bool(control[[graph.mlp_node(layer) for layer in range(LAYERS)]].sum() == 1)


def test_template_alignment_pairs_the_shared_ends_and_groups_the_instructions(demo_tokenizer):
    clean = demo_tokenizer(format_prompt(demo_tokenizer, "How do I rob a bank quickly?"))["input_ids"]
    corrupted = demo_tokenizer(format_prompt(demo_tokenizer, "Bake bread"))["input_ids"]
    alignment = align_pair(clean, corrupted, "template")
    assert len(clean) != len(corrupted) and alignment.prefix >= 1 and alignment.suffix >= 1
    assert clean[-alignment.suffix:] == corrupted[-alignment.suffix:]
    matrix = alignment.matrix()
    assert torch.allclose(matrix.sum(1), torch.ones(len(clean), dtype=torch.float64))
    assert matrix[-1, -1] == 1 and matrix[0, 0] == 1
    with pytest.raises(SafeneuronsError, match="same length"):
        align_pair(clean, corrupted, "equal")
    with pytest.raises(SafeneuronsError, match="do not end with the same tokens"):
        align_pair([1, 2, 3], [1, 4, 5], "template")


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_an_moe_block_is_one_node_and_the_identities_hold(family, demo_tokenizer):
    """Each family's MoE block (shared expert, GPT-OSS's tuple output and attention sinks included) is the MLP node:
    no edge patched is the clean run, every edge the corrupted run, and its edges sum to its node attribution."""
    model = tiny_moe(family, demo_tokenizer, seed=1).double()
    generator = torch.Generator().manual_seed(1)
    clean, corrupted = (torch.randint(3, model.config.vocab_size, (1, 7), generator=generator) for _ in range(2))
    pair = prepare_pair(model, LOGIT_DIFF, 0, clean, corrupted, "equal")
    graph = CircuitGraph.of(model)
    every, none = circuit_metrics(model, graph, LOGIT_DIFF, pair,
                                  [graph.adjacency(), torch.zeros_like(graph.adjacency())], batch_size=2)
    assert every == pair.clean_metric and none == pytest.approx(pair.corrupted_metric, abs=1e-6)
    sums = attribution_scores(model, graph, LOGIT_DIFF, pair, 0).sum(0)
    result = ActivationPatcher(metric=LOGIT_DIFF).patch_sweep(model, clean, corrupted,
                                                              [PatchingSite(1, "mlp_out", None, "all")],
                                                              method="attribution")
    effect = result.effects[0]
    assert float(sums[graph.mlp_node(1)]) == pytest.approx(effect.patched_metric - effect.clean_metric, rel=1e-5)


def test_layouts_whose_outputs_are_normed_or_fused_are_refused(demo_tokenizer):
    for arch in ("gemma2", "phi3"):
        with pytest.raises(SafeneuronsError, match="edge circuits need"):
            check_layout(tiny_model(arch, demo_tokenizer), arch)


# ------------------------------------------------------------------------------------------------ the command

CIRCUIT = ["circuit", "--model", "demo-chat", "--n-pairs", "2", "--exact", "top", "--top-k", "30",
           "--fractions", "0.01,0.05,0.2,1", "--random-seeds", "2", "--ig-steps", "3", "--removal-prompts", "3",
           "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("circuit") / "one"
    assert cli.main([*CIRCUIT, "--out", str(out)]) == 0
    return json.loads((out / "circuit.json").read_text()), out


def test_circuit_command_writes_the_graph_scores_curves_and_figures(one_rank):
    result, out = one_rank
    assert {"circuit.json", "circuit.png", "faithfulness.png", "report.txt"} <= {path.name for path in out.iterdir()}
    assert result["graph"]["edges"] == len(result["edges"]["names"]) == len(result["edges"]["eap_ig"])
    assert len(result["edges"]["exact"]) == 30 and result["agreement"]["edges_exact"] == 30
    assert result["curves"]["eap-ig"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)  # float32, batched
    assert len(result["random"]["curves"]) == 2
    assert result["circuit"]["size"] == len(result["circuit"]["edges"]) > 0
    removal = result["removal"]
    assert removal["prompts"] == 3 and len(removal["random"]) == 2
    assert removal["heads"] + removal["mlps"] == len(result["circuit"]["nodes"])
    for entry in (removal["baseline"], removal["circuit"], *removal["random"]):
        low, high = entry["refusal_rate"]["interval"]
        assert entry["refusal_rate"]["n"] == 3 and low <= entry["refusal_rate"]["rate"] <= high
    assert result["metrics"]["empty"] == pytest.approx(result["metrics"]["corrupted"], abs=1e-3) or \
        result["alignments"][0]["clean_tokens"] != result["alignments"][0]["corrupted_tokens"]


@pytest.mark.parametrize("sharding", [[], ["--shard", "layers"]], ids=["two-ranks", "two-stages"])
def test_two_ranks_and_two_stages_give_the_one_rank_circuit_bit_for_bit(one_rank, tmp_path, sharding):
    """Pairs split over 2 ranks, or the layers over 2 stages (each stage scoring its own receivers, the nodes'
    differences and the hidden states passed up, their gradients down): every score, curve and rate as 1 rank."""
    result = run_ranks(["safeneurons.cli", *CIRCUIT, *sharding, "--out", str(tmp_path / "two")], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "circuit.json").read_text())
    for key in ("edges", "curves", "random", "metrics", "circuit", "agreement", "removal"):
        assert two[key] == one_rank[0][key], key


@pytest.mark.parametrize("extra, expected", [
    (["--circuit-size", "999999"], "--circuit-size 999999 is beyond the graph: it has 1108 edges"),
    (["--alignment", "equal"], "--alignment equal needs prompts of the same length"),
    (["--fractions", "0.5,0.1"], "expected increasing fractions"),
    (["--deepspeed", str(Path(__file__).parents[2] / "ds_configs" / "zero3_inference.json")],
     "--deepspeed (ZeRO-3) is not supported by this command"),
])
def test_bad_input_fails_in_one_line(extra, expected, workspace, capsys, no_model_load):
    error = run_expecting_error([*CIRCUIT, *extra, "--out", str(workspace / "new")], workspace, capsys)
    assert expected in error
