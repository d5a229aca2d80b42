"""`pipeline --neuron-patching`: the neuron study (interp/neurons/study.py) on the study's aligned model and its
base (`--neuron-base-model`; demo-base with the demo), on the study's held-out harmful prompts, scoring data and
utility data, as one more stage and a report section with its verdict."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from safeneurons.interp.neurons.study import NeuronStudyConfig
    from safeneurons.workflows.pipeline.settings import PipelineConfig
    from safeneurons.workflows.pipeline.study import Study

STAGE = "neuron_patching"


def study_config(s: PipelineConfig) -> NeuronStudyConfig:
    from safeneurons.interp.neurons.rankings import WEIGHT_METHODS
    from safeneurons.interp.neurons.study import NeuronStudyConfig

    return NeuronStudyConfig(prompts=s.harmful_data, limit=s.eval_limit, safety_data=s.prune_data,
                             utility_data=s.utility_data, nsamples=s.nsamples, setdiff_method=s.prune_method
                             if s.prune_method in WEIGHT_METHODS else "wandg",
                             setdiff_p=s.setdiff_p or s.sparsity_ratio, fractions=s.neuron_fraction_list,
                             random_seeds=s.neuron_seed_list, max_new_tokens=s.max_new_tokens,
                             batch_size=s.eval_batch_size, score_batch_size=s.score_batch_size,
                             max_length=s.max_length, seed=s.seed, data_dir=s.data_dir, add_eos=s.add_eos)


def check_neuron_inputs(s: PipelineConfig) -> None:
    """Before the study starts: the base model's structure against the aligned model's (configs only)."""
    from safeneurons.models.loading import ModelSource

    study_config(s).check_inputs(ModelSource(s.model, s.dtype, None, s.cache_dir),
                                 ModelSource(s.neuron_base_model, s.dtype, None, s.cache_dir))


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
        result = study_neurons(chat.model, base.model, chat.tokenizer, study_config(s), (s.model, s.neuron_base_model))
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
