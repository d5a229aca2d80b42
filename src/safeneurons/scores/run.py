"""`score` as one call: check the inputs, load the model, score it and write the masks."""
from __future__ import annotations

from pathlib import Path

from safeneurons.data.readers import check_sources
from safeneurons.models.blocks import load_source
from safeneurons.models.loading import ModelSource, model_skeleton
from safeneurons.runtime import distributed
from safeneurons.runtime.outputs import check_output_dir
from safeneurons.scores.config import ScoreConfig, ScoreResult, check_granularity
from safeneurons.scores.outputs import write_score_outputs
from safeneurons.scores.schedules import score_model


def check_score_inputs(config: ScoreConfig, out: str | Path) -> None:
    """Bad settings, an unwritable output and missing data sets fail here, before any process group or model."""
    config.validate()
    check_output_dir(out)
    if config.method != "random":
        check_sources(config.data, config.utility_source if config.set_difference else None,
                      directory=config.data_dir)


def run_score(model: ModelSource, config: ScoreConfig, out: str | Path, save_scores: bool = False) -> ScoreResult:
    """Collective: the masks (and with `save_scores` the raw scores) of `model` written to `out`; every rank gets
    its own part of the result, rank 0 the complete summary."""
    check_score_inputs(config, out)
    model.check()
    if config.granularity == "expert":  # the model's experts, from its config alone
        check_granularity(model_skeleton(model.name, model.cache_dir), config, model.name)
    context = distributed.init_distributed(require_process_group=model.deepspeed is not None or model.shard != "none")
    loaded = load_source(model, context.device)
    result = score_model(loaded.model, loaded.tokenizer, config)
    result.summary.update(model=model.name, dtype=model.dtype, deepspeed=model.deepspeed, shard=model.shard,
                          model_source=model.provenance())
    write_score_outputs(result, out, save_scores)
    return result
