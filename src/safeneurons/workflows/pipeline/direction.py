"""`pipeline --direction`: the refusal direction of the base model as one more stage (on the held-out harmful and
harmless prompts of the study, linked to the study's safety mask), and its section of the report. When the
original's filter keeps no candidate, the stage takes the default fallback (the lowest bypass among candidates of
bounded KL) and says that the filter discarded it, instead of stopping the study."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from safeneurons.errors import SafeneuronsError

if TYPE_CHECKING:
    from safeneurons.workflows.pipeline.study import Study

STAGE = "direction"
REPORT_FILE = "direction_report.json"


def direction_stage(study: Study) -> Callable[[Path], None]:
    def work(folder: Path) -> None:
        from safeneurons.interp.direction.run import RefusalDirectionConfig, run_refusal_direction
        from safeneurons.models.loading import ModelSource

        s = study.settings
        if not s.harmless_data:
            raise SafeneuronsError("--direction needs --harmless-data (the direction is harmful minus harmless)")
        config = RefusalDirectionConfig(harmful=s.harmful_data, harmless=s.harmless_data, seed=s.seed,
                                        eval_limit=s.eval_limit, max_new_tokens=s.max_new_tokens,
                                        masks=str(study.masks_of("score")), data_dir=s.data_dir)
        run_refusal_direction(ModelSource(s.model, s.dtype, None, s.cache_dir), config, folder)

    return work


def direction_summary(results: Path) -> dict[str, Any] | None:
    path = results / STAGE / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _rate(entry: dict | None, key: str) -> str:
    from safeneurons.interp.direction.report import rate_text

    return rate_text(entry, key, with_n=False)


def direction_lines(report: dict[str, Any] | None) -> list[str]:
    """The report's "Refusal direction" section."""
    if report is None:
        return []
    best, effects = report["selected"], report["effects"]
    harmful, harmless = effects["harmful"], effects["harmless"]
    from safeneurons.interp.direction.report import selection_note

    filtered = f" **{selection_note(report).strip(' ()')}.**" if report.get("selected_despite_filter") else ""
    filtered += "".join(f" **Warning: {warning}.**" for warning in report.get("warnings", []))
    lines = ["", "## Refusal direction (base model)", "",
             f"Mean harmful − harmless activation at position {best['position']} "
             f"({report['post_instruction_tokens'][best['position']]!r}), layer {best['layer']}: bypass score "
             f"{best['refusal_score']:.3f} (baseline {effects['refusal_score']['baseline']:.3f}), induce "
             f"{best['steering_score']:.3f}, KL {best['kl_div_score']:.4f}.{filtered}", "",
             "| held-out prompts | baseline | ablation | subtraction | orthogonalized | addition |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| harmful: ASR | {_rate(harmful['baseline'], 'asr')} | {_rate(harmful['ablation'], 'asr')} | "
             f"{_rate(harmful['actadd_subtract'], 'asr')} | "
             f"{_rate(report.get('orthogonalized', {}).get('harmful'), 'asr')} | – |",
             f"| harmless: refusal | {_rate(harmless['baseline'], 'refusal_rate')} | – | – | – | "
             f"{_rate(harmless['actadd_add'], 'refusal_rate')} |"]
    links = report.get("links")
    if links:
        alignment, carrying = links["alignment"], links["carrying"]
        lines += ["", f"Safety mask and direction: of the masked `o_proj`/`down_proj` weights' squared norm, "
                      f"{alignment['masked']:.4f} lies along r̂ (unmasked {alignment['unmasked']:.4f}, random mask "
                      f"{alignment['random_mask']:.4f}, a random direction ≈ {alignment['uniform_expectation']:.4f})."
                      f" Refusal score on the held-out harmful prompts with r̂ projected out of the masked weights "
                      f"only: {carrying['masked_only']['refusal_score']:.3f}; of a random mask's: "
                      f"{carrying['random_mask_only']['refusal_score']:.3f}; of all writing weights: "
                      f"{carrying['all']['refusal_score']:.3f} (none: {carrying['none']['refusal_score']:.3f})."]
    return lines
