"""The study's summary, report and terminal tables."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from safeneurons.analysis.plots import pyplot, save_figure
from safeneurons.analysis.study import TABLE_HEADER as STUDY_HEADER
from safeneurons.workflows.pipeline.calibration import rule_text
from safeneurons.workflows.pipeline.defences import LABELS as DEFENCE_LABELS
from safeneurons.workflows.pipeline.defences import arm_costs, cost_lines
from safeneurons.workflows.pipeline.circuit import circuit_lines, circuit_summary
from safeneurons.workflows.pipeline.direction import direction_lines, direction_summary
from safeneurons.workflows.pipeline.neurons import neuron_lines, neuron_summary
from safeneurons.workflows.pipeline.settings import PARTIAL_STRENGTH, SAFETY_WEIGHT
from safeneurons.workflows.pipeline.stages import Run

if TYPE_CHECKING:
    from safeneurons.workflows.pipeline.study import Study

ARM_LABELS = {"base": "base (not fine-tuned)", "plain": "plain", "safety_frozen": "safety-frozen",
              "setdiff_frozen": "set-difference frozen",
              "random_frozen": "random-frozen (control)", "partial_frozen": f"partial freeze (s={PARTIAL_STRENGTH})",
              "dynamic_frozen": "dynamic freeze (union)", "safety_loss": f"safety loss (λ={SAFETY_WEIGHT})",
              "lora_plain": "LoRA", "lora_protected": "LoRA, safety-masked", **DEFENCE_LABELS}


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
    from safeneurons.analysis.study import aggregate_arm

    return {attack: {arm: aggregate_arm([run_row(study, Run(attack, arm, seed)) for seed in study.settings.seed_list])
                     for arm in study.arms[1:]} for attack in study.settings.attack_list}


def plot_arms(arms: dict[str, dict], path: Path) -> Path:
    """arms.png: per arm the three rates with their 95% Wilson intervals, each bar labelled with its value (a rate
    of 0 draws no bar, so the label shows it)."""
    plt = pyplot()
    names = list(arms)
    metrics = [("refusal_rate", "refusal rate (harmful)"), ("asr", "attack success rate (harmful)"),
               ("harmless_refusal_rate", "refusal rate (harmless)")]
    figure, axis = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(metrics)
    for offset, (key, label) in enumerate(metrics):
        values = [arms[arm][key] or 0.0 for arm in names]
        intervals = [arms[arm].get(f"{key}_interval") or (value, value) for arm, value in zip(names, values)]
        errors = [[value - low for value, (low, _) in zip(values, intervals)],
                  [high - value for value, (_, high) in zip(values, intervals)]]
        bars = axis.bar([index + (offset - 1) * width for index in range(len(names))], values, width=width,
                        label=label, yerr=errors, capsize=2, error_kw={"linewidth": 0.8})
        axis.bar_label(bars, labels=["–" if arms[arm][key] is None else f"{arms[arm][key]:.2f}" for arm in names],
                       fontsize=6, padding=2)
    axis.set_xticks(range(len(names)), [ARM_LABELS[arm] for arm in names], fontsize=8)
    axis.set_xlabel("arm")
    axis.set_ylabel("rate (fraction of prompts)")
    axis.set_ylim(0, 1.12)
    axis.set_title("refusal and attack success per arm (95% Wilson intervals)")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    return path


def save_original_format_masks(source: Path, target: Path) -> None:
    """torch.save of a dict parameter name -> bool tensor: the original extension's mask file."""
    from safeneurons.masks.io import load_masks
    from safeneurons.runtime.outputs import atomic_file

    with atomic_file(target) as tmp:
        torch.save(load_masks(source), tmp)


def scored_experts(study: Study) -> dict[str, dict]:
    """On a mixture of experts, what the scoring stages found per MoE layer and expert: the safety scores' shares,
    the set difference's selected weights, the response tokens each expert received (score_summary.json's
    `experts`)."""
    found = {}
    for stage, key in (("score", "safety"), ("score_setdiff", "set_difference")):
        path = study.results / stage / "score_summary.json"
        if path.is_file() and "experts" in json.loads(path.read_text()):
            found[key] = json.loads(path.read_text())["experts"]
    return found


def expert_lines(experts: dict[str, dict] | None) -> list[str]:
    """Which experts the safety-critical weights sit in, layer by layer."""
    if not experts:
        return []
    safety, setdiff = experts.get("safety", {}), experts.get("set_difference", {})
    lines = ["", "## Experts", "", "Per MoE layer and routed expert: its share of the layer's experts' safety score, "
             "the set difference's selected weights in it, and the safety data's response tokens routed to it.", "",
             "| layer | safety-score share per expert | set-difference weights per expert "
             "| response tokens per expert |",
             "| --- | --- | --- | --- |"]
    for layer, record in safety.items():
        share = " ".join(f"{value:.2f}" for value in record.get("score_share", []))
        chosen = " ".join(str(value) for value in setdiff.get(layer, {}).get("selected", [])) or "–"
        tokens = " ".join(str(value) for value in record.get("response_tokens", []))
        lines.append(f"| {layer} | {share or '–'} | {chosen} | {tokens or '–'} |")
    return lines


def write_final_outputs(study: Study) -> dict:
    """analysis_summary.json, the two .pt mask files, arms.png, curves.png and report.md in results_path (rank 0)."""
    from safeneurons.analysis.study import plot_curves, verdict
    from safeneurons.runtime.outputs import write_json

    results = study.results
    comparison = json.loads((results / "compare" / "analysis_summary.json").read_text())
    arms = arm_results(study)
    attacks = study_results(study)
    summary = {**comparison, "model": study.settings.model, "profile": study.settings.profile, "arms": arms,
               "reference_run": {"attack": study.reference[0], "seed": study.reference[1]},
               "study": {"seeds": list(study.settings.seed_list), "attacks": attacks},
               "verdict": verdict(attacks, arms["base"], ARM_LABELS), "settings": asdict(study.settings),
               "learning_rates": study.rates, "costs": arm_costs(study)}
    if study.calibration:
        summary["attack_strength"] = {
            "rule": rule_text(study.settings.attack_halving_fraction, study.settings.attack_rate_list),
            "attacks": {attack: result.to_json() for attack, result in study.calibration.items()}}
    save_original_format_masks(study.masks_of("score"), results / "original_safety_masks.pt")
    save_original_format_masks(study.masks_of("rescore"), results / "new_safety_masks.pt")
    plot_arms(arms, results / "arms.png")
    plot_curves(attacks, ARM_LABELS, results / "curves.png")

    experts = scored_experts(study)
    if experts:
        summary["experts"] = experts
    if study.settings.direction:
        summary["direction"] = direction_summary(results)
    if study.settings.circuit:
        summary["circuit"] = circuit_summary(results)
    if study.settings.neuron_patching:
        summary["neuron_patching"] = neuron_summary(results)
    write_json(results / "analysis_summary.json", summary)
    write_report(summary, results / "report.md")
    return summary


def plural(count: int, noun: str, counted: bool = True) -> str:
    """ "1 epoch", "3 epochs"; uncounted "optimizer step" for 1 ("every optimizer step"), "5 optimizer steps"."""
    if count == 1:
        return f"1 {noun}" if counted else noun
    return f"{count} {noun}s"


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
    from safeneurons.analysis.study import table_rows

    return table_rows(summary["study"]["attacks"], ARM_LABELS)


def rates_text(summary: dict) -> str:
    """The fine-tuning rate: one for every attack, or each attack's (chosen by the attack-strength rule)."""
    rates = summary.get("learning_rates") or {}
    if len(set(rates.values())) <= 1:
        return f"{next(iter(rates.values()), summary['learning_rate']):g}"
    return ", ".join(f"{rate:g} ({attack} attack)" for attack, rate in rates.items())


def attack_strength_lines(summary: dict) -> list[str]:
    """The attack-strength rule, every rate it tried per attack and the one it chose."""
    strength = summary.get("attack_strength")
    if not strength:
        return []
    lines = ["", "## Attack strength", "", f"Each attack's learning rate is {strength['rule']}.", "",
             "| attack | learning rate | steps | refusal halved at step | passes (K) |",
             "| --- | --- | --- | --- | --- |"]
    notes = []
    for attack, result in strength["attacks"].items():
        for trial in result["trials"]:
            halved = trial["halved_at"]
            passed = halved is None or halved >= result["limit"]
            chosen = " **chosen**" if trial["rate"] == result["chosen"] else ""
            lines.append(f"| {attack} | {trial['rate']:g}{chosen} | {trial['steps']} | "
                         f"{'never' if halved is None else halved} | {'yes' if passed else 'no'} ({result['limit']}) |")
        if not result["passed"]:
            notes.append(f"Under the {attack} attack no candidate passed: the smallest, {result['chosen']:g}, is kept, "
                         f"and the attack is stronger than the rule allows.")
        elif result["chosen_halved_at"] is None:
            notes.append(f"Under the {attack} attack at {result['chosen']:g} plain's refusal never halved within the "
                         f"run: protection cannot show as a slower loss.")
    return lines + (["", *notes] if notes else [])


def write_report(summary: dict, path: Path) -> Path:
    from safeneurons.runtime.outputs import atomic_file

    settings = summary["settings"]
    lines = [f"# safeneurons pipeline: {summary['model']}", "",
             f"Scored with `{summary['prune_method']}` on `{summary['prune_data']}` (sparsity ratio "
             f"{summary['sparsity_ratio']}, {settings['nsamples']} samples), fine-tuned on "
             f"`{summary['training_data']}` for {plural(summary['num_epochs'], 'epoch')} at learning rate "
             f"{rates_text(summary)}; evaluated on "
             f"`{settings['harmful_data']}` (harmful), `{settings['harmless_data']}` (harmless) and perplexity on "
             f"`{settings['perplexity_data']}`.", "", f"**{summary['verdict']}**", *attack_strength_lines(summary),
             "", "## The study", "",
             f"Each fine-tuned arm under each attack, over seeds {', '.join(map(str, summary['study']['seeds']))} "
             f"(each seed orders the fine-tuning data): the mean and its 95% t-interval over the seeds. Refusal "
             f"measured every {plural(settings['eval_every'], 'optimizer step', counted=False)} on "
             f"{settings['curve_limit']} held-out "
             f"harmful prompts (greedy, {settings['curve_max_new_tokens']} new tokens).", "",
             "| " + " | ".join(STUDY_HEADER) + " |", "|" + " --- |" * len(STUDY_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in study_table_rows(summary)]
    lines += cost_lines(summary["costs"], ARM_LABELS)
    lines += ["", "![refusal curves](curves.png)", "",
              f"## Arms: one run each ({summary['reference_run']['attack']} attack, seed "
              f"{summary['reference_run']['seed']})", "",
              "| " + " | ".join(ARM_TABLE_HEADER) + " |", "|" + " --- |" * len(ARM_TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in arm_table_rows(summary["arms"], summary.get("arms_weight_drift"))]
    lines += judge_lines(summary["arms"])
    lines += ["", "Rates with their 95% Wilson interval. \"max abs Δ safety set\": the largest change of the safety-critical weights in that arm, frozen "
              "or not (\"–\" where the arm froze another set)."]
    lines += ["", "![arms](arms.png)", "", "## Safety-critical weights before and after fine-tuning", "",
              f"- before: {summary['original_safety_critical_count']} of {summary['total_weights']} weights; after "
              f"(re-scored safety-frozen model): {summary['new_safety_critical_count']}",
              f"- overlap |A∩B|/|A| = {_number(summary['overlap'], 4)}, "
              f"Jaccard = {_number(summary['jaccard'], 4)}", "",
              "![overlap per layer](compare/overlap_per_layer.png)", "", "| module | overlap | Jaccard |",
              "| --- | --- | --- |"]
    lines += [f"| {name} | {_number(row['overlap'], 4)} | {_number(row['jaccard'], 4)} |"
              for name, row in summary["per_module"].items()]

    lines += expert_lines(summary.get("experts"))
    lines += direction_lines(summary.get("direction"))
    lines += circuit_lines(summary.get("circuit"))

    lines += neuron_lines(summary.get("neuron_patching"))
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
    console = Console()
    if not console.is_terminal:  # piped to a file: as wide as the tables need, nothing cut
        console = Console(width=1000)
    for title, header, rows in tables:
        table = Table(title=f"safeneurons pipeline — {summary['model']}: {title}")
        for index, column in enumerate(header):  # a narrow terminal folds a cell, never cuts it
            table.add_column(column, justify="left" if index < 2 else "right", overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(overlap)
    console.print(f"[bold]{summary['verdict']}[/bold]")
    console.print(footer)
