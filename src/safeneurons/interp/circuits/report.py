"""The circuit study's files: circuit.json, circuit.png (the circuit drawn layer by layer), faithfulness.png (the
curves with the random band) and report.txt, published together by rank 0."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from safeneurons.analysis.plots import pyplot, save_figure
from safeneurons.interp.circuits.faithfulness import KEEP, random_band
from safeneurons.interp.patching.run import publish_files
from safeneurons.runtime.outputs import write_json

if TYPE_CHECKING:
    from safeneurons.interp.circuits.analysis import CircuitResult
    from safeneurons.interp.circuits.graph import CircuitGraph

STYLES = {"q": "-", "k": "--", "v": ":", "mlp_in": "-", "logits": "-"}


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def report_lines(result: CircuitResult) -> list[str]:
    graph, metrics, agreement = result.graph, result.metrics, result.agreement
    keep = round(KEEP * 100)
    lines = [f"circuit of {result.model}: {graph['nodes']} nodes, {graph['receivers']} receivers, {graph['edges']} "
             f"edges ({graph['layers']} layers, {graph['heads']} heads, {graph['kv_heads']} key/value heads)",
             f"metric over {len(result.alignments)} pairs: clean {metrics['clean']:.4f}, corrupted run "
             f"{metrics['corrupted']:.4f}, every edge corrupted {metrics['empty']:.4f}",
             "", f"{'ranking':<10} {'CPR':>7} {'CMD':>7} {f'edges for {keep}%':>16}"]
    band = random_band(result.random)
    for curve in result.curves.values():
        lines.append(f"{curve.name:<10} {curve.cpr:>7.3f} {curve.cmd:>7.3f} {curve.edges_to_keep() or 'none':>16}")
    randoms = [curve.cpr for curve in result.random]
    lines.append(f"{'random':<10} {sum(randoms) / len(randoms):>7.3f} {'':>7} (CPR mean of {len(randoms)} seeds, "
                 f"faithfulness at 100%: {band['mean'][-1]:.3f})")
    lines += ["", "faithfulness by circuit size (fraction of edges):",
              "  " + " ".join(f"{fraction:>7.3g}" for fraction in result.curves["eap-ig"].fractions)]
    for name in ("eap-ig", "eap"):
        lines.append(f"  {' '.join(f'{value:>7.3f}' for value in result.curves[name].values)}  {name}")
    lines.append(f"  {' '.join(f'{value:>7.3f}' for value in band['mean'])}  random (mean)")
    if agreement["edges_exact"]:
        k = agreement["overlap_k"]
        lines += ["", f"exact edge patching of {agreement['edges_exact']} edges: Spearman with EAP "
                      f"{_number(agreement['spearman_eap_exact'])}, with EAP-IG "
                      f"{_number(agreement['spearman_eap_ig_exact'])}; top-{k} overlap EAP "
                      f"{_number(agreement[f'top{k}_overlap_eap'], 2)}, EAP-IG "
                      f"{_number(agreement[f'top{k}_overlap_eap_ig'], 2)}"]
    circuit = result.circuit
    lines += ["", f"circuit chosen ({circuit['ranking']}, {circuit['selection']}): {circuit['size']} edges, "
                  f"faithfulness {_number(circuit['faithfulness'])}, {len(circuit['nodes'])} nodes: "
                  f"{', '.join(circuit['nodes'][:12])}{' …' if len(circuit['nodes']) > 12 else ''}"]
    if result.masks is not None:
        lines.append(f"safety-critical weights (mask) in the circuit's nodes: {_number(result.masks['mask_share'])} of "
                     f"the mask against {_number(result.masks['random_share'])} for a random mask (x"
                     f"{_number(result.masks['enrichment'], 2)})")
    return lines + removal_lines(result.removal)


def removal_lines(removal: dict | None) -> list[str]:
    if not removal:
        return []

    def rate(entry: dict, key: str) -> str:
        low, high = entry[key]["interval"]
        return f"{entry[key]['rate']:.2f} [{low:.2f}, {high:.2f}]"
    lines = ["", f"removal while answering {removal['prompts']} held-out harmful prompts ({removal['heads']} heads and "
                 f"{removal['mlps']} MLPs mean-ablated; {removal['judge']} judge, 95% Wilson intervals):",
             f"  baseline        refusal {rate(removal['baseline'], 'refusal_rate')}  ASR "
             f"{rate(removal['baseline'], 'asr')}",
             f"  circuit removed refusal {rate(removal['circuit'], 'refusal_rate')}  ASR "
             f"{rate(removal['circuit'], 'asr')}"]
    lines += [f"  random nodes {seed}  refusal {rate(entry, 'refusal_rate')}  ASR {rate(entry, 'asr')}"
              for seed, entry in enumerate(removal["random"])]
    return lines


def plot_faithfulness(result: CircuitResult, path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    band = random_band(result.random)
    fractions = result.curves["eap-ig"].fractions
    axes.fill_between(fractions, band["min"], band["max"], color="grey", alpha=0.3,
                      label=f"random circuits ({len(result.random)} seeds, min–max)")
    axes.plot(fractions, band["mean"], color="grey", linestyle="--", label="random (mean)")
    for curve in result.curves.values():
        axes.plot(curve.fractions, curve.values, marker="o", label=f"{curve.name} (CPR {curve.cpr:.2f})")
    axes.axhline(1.0, color="black", linewidth=0.5)
    axes.axhline(KEEP, color="black", linewidth=0.5, linestyle=":")
    axes.set_xscale("log")
    axes.set_xlabel("circuit size (fraction of the graph's edges)")
    axes.set_ylabel("faithfulness (m_circuit − m_empty) / (m_clean − m_empty)")
    axes.set_title(f"faithfulness of refusal circuits: {result.model}")
    axes.legend(fontsize=8)
    save_figure(figure, path)


def plot_circuit(result: CircuitResult, graph: CircuitGraph, path: Path) -> None:
    """Nodes in columns by layer (heads, then the MLP half a column right), edges from node to the node their
    receiver feeds (q solid, k dashed, v dotted), width by |score|, red positive, blue negative."""
    plt = pyplot()
    height = max(4.0, 0.35 * (graph.n_heads + 2))
    figure, axes = plt.subplots(figsize=(max(8.0, 0.6 * graph.n_layers + 3), height))
    names = result.nodes

    def place(name: str) -> tuple[float, float]:
        middle = (graph.n_heads - 1) / 2
        if name in ("input", "logits"):
            return (-1.0 if name == "input" else float(graph.n_layers)), middle
        layer, component, *rest = name.split(".")
        x = float(layer[1:])
        return (x, float(rest[0][1:])) if component == "attn_head" else (x + 0.5, -1.0)
    edges = result.circuit["edges"]
    largest = max((abs(edge["score"]) for edge in edges), default=1.0) or 1.0
    receivers = {name: index for index, name in enumerate(graph.receiver_names())}
    for edge in edges:
        source, receiver = edge["edge"].split("->")
        part = receiver if receiver == "logits" else receiver.split(".")[1]
        fed = [names[node] for node in graph.fed_nodes(receivers[receiver])] or ["logits"]
        (x0, y0), (x1, y1) = place(source), place(fed[0])  # a key/value head: its group's first query head
        axes.plot([x0, x1], [y0, y1], linestyle=STYLES[part], color="tab:red" if edge["score"] > 0 else "tab:blue",
                  linewidth=0.3 + 3 * abs(edge["score"]) / largest, alpha=0.7)
    used = {edge["edge"].split("->")[0] for edge in edges} | {"logits"}
    for name in names + ["logits"]:
        x, y = place(name)
        axes.scatter([x], [y], s=25 if name in used else 6, color="black" if name in used else "lightgrey", zorder=3)
    axes.set_xlabel("layer (heads at the integer, the MLP half a layer right; input left, logits right)")
    axes.set_yticks(range(-1, graph.n_heads), ["MLP"] + [f"head {head}" for head in range(graph.n_heads)])
    axes.set_ylabel("node (attention head, or the layer's MLP)")
    axes.set_title(f"refusal circuit of {result.model}: {result.circuit['size']} edges, faithfulness "
                   f"{_number(result.circuit['faithfulness'])}")
    save_figure(figure, path)


def publish(result: CircuitResult, graph: CircuitGraph, out: str | Path) -> None:
    report = "\n".join(report_lines(result))
    publish_files(out, {"circuit.json": lambda path: write_json(path, result.to_dict()),
                        "circuit.png": lambda path: plot_circuit(result, graph, path),
                        "faithfulness.png": lambda path: plot_faithfulness(result, path),
                        "report.txt": lambda path: path.write_text(report + "\n")})
    print(report)
    print(f"-> {out}/circuit.json, circuit.png, faithfulness.png, report.txt")
