"""`pipeline --neuron-patching`: the neuron study (interp/neurons/study.py) on the study's aligned model and its
base (`--neuron-base-model`; demo-base with the demo), on the study's held-out harmful prompts, scoring data and
utility data, as one more stage and a report section with its verdict."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from safeneurons.workflows.pipeline.settings import neuron_study_config

if TYPE_CHECKING:
    from safeneurons.workflows.pipeline.study import Study

STAGE = "neuron_patching"


def neuron_stage(study: Study) -> Callable[[Path], None]:
    def work(folder: Path) -> None:
        from safeneurons.interp.neurons.report import write_study
        from safeneurons.interp.neurons.study import study_neurons
        from safeneurons.models.loading import load_for_inference
        from safeneurons.models.structure import check_same_tokenizer

        s = study.settings
        chat = load_for_inference(s.model, s.dtype, None, s.cache_dir, study.device)
        base = load_for_inference(s.neuron_base_model, s.dtype, None, s.cache_dir, study.device)
        check_same_tokenizer(chat.tokenizer, base.tokenizer, s.model, s.neuron_base_model)
        result = study_neurons(chat.model, base.model, chat.tokenizer, neuron_study_config(s),
                               (s.model, s.neuron_base_model))
        if result is not None:
            write_study(result, folder)

    return work


def neuron_summary(results: Path) -> dict[str, Any] | None:
    from safeneurons.interp.neurons.study import REPORT_FILE

    path = results / STAGE / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def neuron_lines(report: dict[str, Any] | None) -> list[str]:
    """The report's "Safety neurons" section."""
    if report is None:
        return []
    from safeneurons.interp.neurons.report import summary_lines
    from safeneurons.interp.neurons.study import FIGURE_FILE, NeuronStudyResult

    return ["", "## Safety neurons: patched between the aligned model and its base during generation", "",
            f"Aligned model {report['chat_model']}, base {report['base_model']}: each ranking's top k% of every "
            f"layer's MLP neurons take the other model's values at every generated token.", "",
            *summary_lines(NeuronStudyResult(**report)), "", f"![neuron patching]({STAGE}/{FIGURE_FILE})"]
