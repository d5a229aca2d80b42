"""`safeneurons neurons`, the library call: both models loaded, the study run across the ranks, its files
written (rank 0)."""
from __future__ import annotations

from pathlib import Path

from safeneurons.interp.neurons.report import write_study
from safeneurons.interp.neurons.study import NeuronStudyConfig, NeuronStudyResult, study_neurons
from safeneurons.models.loading import ModelSource
from safeneurons.models.structure import check_same_tokenizer
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import check_output_dir


def run_neuron_study(chat: ModelSource, base: ModelSource, config: NeuronStudyConfig,
                     out: str | Path) -> NeuronStudyResult | None:
    """Collective: the whole study written to `out` (neuron_patching.json and .png), its verdict printed; the
    result on rank 0, None elsewhere."""
    config.check_inputs(chat, base)
    check_output_dir(out)
    context = distributed.init_distributed()
    loaded_chat, loaded_base = chat.load(context.device), base.load(context.device)
    check_same_tokenizer(loaded_chat.tokenizer, loaded_base.tokenizer, chat.name, base.name)
    result = study_neurons(loaded_chat.model, loaded_base.model, loaded_chat.tokenizer, config,
                           (chat.name, base.name))
    if result is not None:
        write_study(result, out)
    return result
