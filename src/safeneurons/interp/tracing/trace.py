"""`trace` as one call: both models' MLP activations over shared tokens, matched layer by layer, p-values.

The ranks split the tokens of both models' passes and gather each layer's activations on the ranks whose layer
pairs (assigned round-robin) need them; each rank solves its pairs' assignments and rank 0 gathers the p-values
and writes the results."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from safeneurons.errors import SafeneuronsError
from safeneurons.interp.tracing.activations import MlpActivations, collect_shared
from safeneurons.interp.tracing.assignment import KINDS, resolve_solver
from safeneurons.interp.tracing.lineage import TraceResult, layer_pairs, match_layer, summarize
from safeneurons.interp.tracing.report import plot_trace, summary_line
from safeneurons.interp.tracing.sharded import check_sharded_trace, sharded_activations
from safeneurons.interp.tracing.config import TraceConfig
from safeneurons.interp.tracing.tokens import pack_tokens, random_token_ids, text_token_ids
from safeneurons.models.hooks import SiteKey
from safeneurons.models.loading import ModelSource, load_config, load_tokenizer
from safeneurons.models.structure import check_same_tokenizer
from safeneurons.runtime import distributed
from safeneurons.runtime.memory import GIB
from safeneurons.runtime.outputs import write_json


def _collect_model(source: ModelSource, device: torch.device, needed: Mapping[SiteKey, set[int]],
                   batches: Sequence[dict[str, torch.Tensor]], memory_limit: float,
                   spill_dir: str | None) -> MlpActivations:
    loaded = source.load(device)
    model, engine = loaded.model, loaded.engine
    try:
        return collect_shared(model, batches, needed, memory_limit, spill_dir)
    finally:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        del model, engine
        gc.collect()


def _token_batches(config: TraceConfig, tokenizer: Any, max_positions: int) -> list[dict[str, torch.Tensor]]:
    if config.random_tokens:
        ids = random_token_ids(len(tokenizer), config.n_tokens, config.seed)
    else:
        ids = text_token_ids(tokenizer, config.sources, config.n_tokens, config.seed, config.data_dir)
    if not ids:
        raise SafeneuronsError(f"--data {config.data} gives no tokens")
    return pack_tokens(ids, min(config.max_length, max_positions), config.batch_size)


def _needs(pairs: Sequence[tuple[int, int]]) -> list[dict[SiteKey, set[int]]]:
    """Per model, the ranks that need each site: those whose layer pairs read it."""
    needs: list[dict[SiteKey, set[int]]] = [{}, {}]
    for index, pair in enumerate(pairs):
        for side in (0, 1):
            for kind in KINDS:
                needs[side].setdefault((pair[side], kind), set()).add(distributed.owner_of(index))
    return needs


def run_trace(config: TraceConfig, out: str | Path) -> TraceResult | None:
    """Collective: the lineage test of `config.other` against `config.base`, written to `out` (trace.json,
    trace.png); the result on rank 0, None elsewhere."""
    config.check_inputs(out)
    base, other = config.base, config.other
    base.check()
    sharded = base.shard == "layers"
    context = distributed.init_distributed(require_process_group=bool(base.deepspeed) or sharded)
    if sharded:
        check_sharded_trace(config)
    solver = resolve_solver(config.solver)
    tokenizer = load_tokenizer(base.name, base.cache_dir)
    check_same_tokenizer(tokenizer, load_tokenizer(other.name, other.cache_dir), base.name, other.name)
    configs = [load_config(source.name, source.cache_dir) for source in (base, other)]
    pairs = layer_pairs(configs[0].num_hidden_layers, configs[1].num_hidden_layers, config.all_layers)
    max_positions = min(getattr(model_config, "max_position_embeddings", config.max_length)
                        for model_config in configs)
    batches = _token_batches(config, tokenizer, max_positions)
    memory_limit = config.memory_limit_gib * GIB
    if sharded:
        activations_base, activations_other, mine = sharded_activations(config, pairs, batches, context.device,
                                                                        memory_limit)
    else:
        mine = [pairs[index] for index in distributed.assign_round_robin(len(pairs))]
        needs = _needs(pairs)
        activations_base = _collect_model(base, context.device, needs[0], batches, memory_limit, config.spill_dir)
        activations_other = _collect_model(other, context.device, needs[1], batches,
                                           max(memory_limit - activations_base.nbytes, 0), config.spill_dir)
    try:
        matches = {(i, j): match_layer(activations_base, activations_other, i, j, solver, context.device)
                   for i, j in distributed.progress(mine, desc="matching layers")}
        failure = ""
    except SafeneuronsError as error:  # tell the other ranks instead of leaving them waiting in the gather
        matches, failure = {}, str(error)
    distributed.all_ranks_ok(not failure, failure)
    gathered = distributed.merge_dicts_to_main(matches)
    if gathered is None:
        return None
    result = summarize(list(gathered.values()), config.all_layers, config.alpha, activations_base.n_tokens, solver)
    write_trace(Path(out), result, config)
    return result


def write_trace(out: Path, result: TraceResult, config: TraceConfig) -> None:
    payload = {"base": config.base.name, "other": config.other.name, **result.to_json(),
               "data": "random tokens" if config.random_tokens else config.data, "seed": config.seed,
               "world_size": distributed.world_size()}
    plot_trace(result, out / "trace.png", f"{config.base.name} vs {config.other.name}")
    write_json(out / "trace.json", payload)
    print(summary_line(result))
    print(f"wrote {out / 'trace.json'} and {out / 'trace.png'}")
