"""`pipeline --circuit`: the aligned model's refusal circuit as edges (interp/circuits) on the study's harmful and
harmless prompts, its nodes compared with the study's safety mask, as one more stage and a report section."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from safeneurons.errors import SafeneuronsError

if TYPE_CHECKING:
    from safeneurons.workflows.pipeline.study import Study

STAGE = "circuit"
REPORT_FILE = "circuit.json"
PAIRS = 8  # harmful/harmless pairs (at most the study's --eval-limit)


def circuit_stage(study: Study) -> Callable[[Path], None]:
    def work(folder: Path) -> None:
        from safeneurons.interp.circuits.run import CircuitConfig, run_circuit
        from safeneurons.models.loading import ModelSource

        s = study.settings
        if not s.harmless_data:
            raise SafeneuronsError("--circuit needs --harmless-data (the corrupted prompts)")
        config = CircuitConfig(harmful=s.harmful_data, harmless=s.harmless_data, n_pairs=min(PAIRS, s.eval_limit),
                               masks=str(study.masks_of("score")), data_dir=s.data_dir)
        run_circuit(ModelSource(s.model, s.dtype, None, s.cache_dir), config, folder)

    return work


def circuit_summary(results: Path) -> dict[str, Any] | None:
    path = results / STAGE / REPORT_FILE
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    return {key: found[key] for key in ("graph", "metrics", "agreement", "mask_overlap")} | {
        "curves": {name: {key: curve[key] for key in ("cpr", "cmd", "edges_for_80pct")}
                   for name, curve in found["curves"].items()},
        "random_cpr": [curve["cpr"] for curve in found["random"]["curves"]],
        "circuit": {key: found["circuit"][key] for key in ("size", "faithfulness", "nodes")}}


def circuit_lines(summary: dict[str, Any] | None) -> list[str]:
    """The report's "Refusal circuit" section."""
    if summary is None:
        return []
    graph, circuit, randoms = summary["graph"], summary["circuit"], summary["random_cpr"]
    lines = ["", "## Refusal circuit (edges)", "",
             f"{graph['edges']} edges between {graph['nodes']} nodes and {graph['receivers']} receivers; the circuit "
             f"chosen has {circuit['size']} edges and {len(circuit['nodes'])} nodes, faithfulness "
             f"{circuit['faithfulness']:.3f}.", "", "| ranking | CPR | CMD | edges for 80% |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {curve['cpr']:.3f} | {curve['cmd']:.3f} | {curve['edges_for_80pct'] or 'none'} |"
              for name, curve in summary["curves"].items()]
    lines.append(f"| random ({len(randoms)} seeds) | {sum(randoms) / len(randoms):.3f} | – | – |")
    overlap = summary.get("mask_overlap")
    if overlap:
        lines += ["", f"The safety mask puts {overlap['mask_share']:.3f} of its weights in the circuit's heads and "
                      f"MLPs; a random mask of the same size would put {overlap['random_share']:.3f} there."]
    return lines + ["", f"![faithfulness]({STAGE}/faithfulness.png) ![circuit]({STAGE}/circuit.png)"]
