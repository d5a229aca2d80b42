"""`safeneurons plan`: memory per GPU of each stage (score, finetune, patch, circuit, trace, eval) for a model and a cluster.

Model states come from DeepSpeed's own ZeRO-3 estimator, plus the optimizer step's transient; activations from a
formula for Hugging Face's Llama in bf16 with SDPA attention (see `activation_bytes_per_token`), and for patching
from the formula `patch` sizes its batches with; masks are bit-packed and partitioned over all ranks; wandg's
sums of |gradient| (8 bytes a weight when fixed, the default) are held for every scored weight on every rank when they fit the score memory budget (else in
rounds of the budget's size, plus the sums a rank owns). Each stage's figure is tested against the measured peak
memory of the real code (tests/workflows/test_plan.py). Offline: the llama2 sizes are built in, other models are read from a
local folder's config.json.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime.launch import discover_launch
from safeneurons.runtime.memory import GIB
from safeneurons.runtime.outputs import check_output_dir, write_json
from safeneurons.scores.sizes import AUTO_MEMORY_FRACTION, element_bytes, owned_bytes
from safeneurons.workflows.plan_model import ModelShape, model_shape
from safeneurons.workflows.plan_layers import (ShardedInputs, sharded_circuit_line, sharded_circuit_report,
                                               sharded_eval_line, sharded_eval_report, sharded_score_line,
                                               sharded_score_report)

# CUDA context, NCCL buffers, the allocator's fragmentation: the share of a GPU a plan may not count on.
RESERVED_FRACTION = 0.10
BF16_BYTES = 2
FP32_BYTES = 4
STAGES = ("score", "finetune", "patch", "circuit", "trace", "eval")
COST_MATRIX_COPIES = 3.1  # trace's float64 I × I distance matrix and its temporaries, measured at I = 4096 and 8192
OFFLOAD_CHOICES = ("none", "optimizer", "param")
# Bytes per trained parameter that the optimizer step adds on the GPU, beside the states: DeepSpeed's fp32
# gradient partition and the square-root temporary of torch's AdamW (foreach, as ds_configs set it) — measured
# (tests/workflows/test_plan.py); with optimizer offload the step runs on the CPU.
OPTIMIZER_STEP_BYTES = 8
PERPLEXITY_LOGIT_BYTES = 12  # per vocabulary entry and token: bf16 logits, fp32 copy, shifted copy, log-softmax
# per vocabulary entry and token, the loss's backward adds the gradients of the fp32 log-softmax and logits and
# the bf16 logits' gradient beside what the forward saved: measured 9.9 (tests/workflows/test_plan.py), and the
# cause of a 10% low score figure on SmolLM2's 49,152-entry vocabulary (tests/real)
LOSS_BACKWARD_LOGIT_BYTES = 10


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float = 80.0
    offload: str = "none"  # none, optimizer (CPU Adam) or param (optimizer and parameters on the CPU)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Workload:
    batch_size: int = 4  # `safeneurons finetune` defaults
    max_length: int = 512
    sparsity_ratio: float = 0.1  # the original extension's default, as in score and pipeline
    gradient_checkpointing: bool = False  # finetune --gradient-checkpointing
    eval_batch_size: int = 16  # `safeneurons eval` defaults
    max_new_tokens: int = 256
    score_batch_size: int = 1  # `safeneurons score` defaults
    score_memory: int | None = None  # score --score-memory in bytes; None = auto (half of what is left free)
    patch_length: int = 128  # tokens of a patching prompt
    patch_batch_size: int | None = None  # patch --batch-size; None = auto (a quarter of what is left free)
    accumulate_dtype: str = "fixed"  # score --accumulate-dtype


def activation_bytes_per_token(shape: ModelShape, length: int) -> tuple[int, int]:
    """Bytes saved for backward per token of sequences of `length` tokens: (per decoder layer, outside the
    layers), bf16.

    Measured on transformers' LlamaForCausalLM with `torch.autograd.graph.saved_tensors_hooks` (unique storages,
    parameters excluded) and fitted with zero residual over shapes varying hidden, kv heads, MLP width, heads
    and vocabulary. Per layer: 20h (the two RMSNorms keep fp32 copies, q/k before and after RoPE, the attention
    output) + 4 kv_dim (k, v) + 8 I (gate, up, SiLU, product) + 4 heads + 8 (softmax statistics); outside the
    layers: 8.5h + 4 V (fp32 log-softmax of the logits) + 52 − 8 heads. That is SDPA; eager attention (measured
    the same way, exact over lengths and grouped-query shapes) keeps instead of SDPA's softmax statistics the
    fp32 softmax and its bf16 copy of the scores, 6 bytes per head and key, and the keys and values expanded to
    every query head (4 (q_width − kv_dim) more).
    """
    per_layer = 20 * shape.hidden + 4 * shape.kv_dim + 8 * shape.intermediate + 4 * shape.heads + 8
    if shape.eager_attention:
        per_layer += 6 * shape.heads * length + 4 * (shape.heads * shape.head_width - shape.kv_dim) - 4 * shape.heads
    outside = (17 * shape.hidden) // 2 + 4 * shape.vocab + 52 - 8 * shape.heads
    return per_layer, outside


def training_activations(shape: ModelShape, sequences: int, length: int, checkpointing: bool = False) -> int:
    """Activations kept for one backward over `sequences` × `length` tokens. With activation checkpointing each
    decoder layer keeps only its bf16 input (2h per token) and the backward recomputes one layer's activations at
    a time."""
    per_layer, outside = activation_bytes_per_token(shape, length)
    tokens = sequences * length
    if checkpointing:
        return tokens * (shape.layers * BF16_BYTES * shape.hidden + outside + per_layer)
    return tokens * (shape.layers * per_layer + outside)


def kv_cache_bytes(shape: ModelShape, sequences: int, length: int) -> int:
    """The bf16 keys and values generation keeps: every layer, every sequence, every token so far."""
    return 2 * shape.layers * shape.kv_dim * BF16_BYTES * sequences * length


@dataclass(frozen=True)
class StageMemory:
    stage: str
    model_states: int
    activations: int
    masks: int
    scores: int
    cpu_per_node: int
    optimizer_step: int = 0  # fine-tuning's step transient; it comes after the backward has freed the activations

    @property
    def total(self) -> int:
        return self.model_states + max(self.activations, self.optimizer_step) + self.masks + self.scores


def zero3_model_states(shape: ModelShape, cluster: Cluster) -> tuple[int, int, int]:
    """DeepSpeed's ZeRO-3 estimate for training: (CPU bytes per node, GPU bytes per GPU, largest layer bytes)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        total_params=shape.total_params, largest_layer_params=shape.largest_param,
        num_gpus_per_node=cluster.gpus_per_node, num_nodes=cluster.nodes,
        cpu_offload=cluster.offload != "none", cpu_offload_params=cluster.offload == "param", zero_init=True)
    return int(cpu), int(gpu), int(largest)


def inference_model_states(shape: ModelShape, cluster: Cluster) -> tuple[int, int]:
    """bf16 parameters (no gradients: not even wandg computes parameter gradients) partitioned over all GPUs, or
    on the CPU with param offload, plus the largest tensor gathered whole: (CPU bytes per node, GPU bytes per GPU)."""
    gathered = BF16_BYTES * shape.largest_param
    if cluster.offload == "param":
        return BF16_BYTES * shape.total_params // cluster.nodes, gathered
    return 0, BF16_BYTES * shape.total_params // cluster.world + gathered


def bitpacked_masks(shape: ModelShape, cluster: Cluster) -> int:
    return math.ceil(shape.scored_params / 8 / cluster.world)


def score_pass_activations(shape: ModelShape, sequences: int, length: int) -> int:
    """Peak activations of one wandg pass (bf16). The hooks keep every scored Linear's input X (one per shared
    input: the two norms' outputs, the attention output, the MLP product) and output gradient dY for |dYᵀX|. The
    forward saves what training saves (the Linear inputs are the same tensors), and the backward frees it layer by
    layer as the dY arrive: the peak is the larger of the two ends, all saved tensors with the loss's logit
    gradients (`LOSS_BACKWARD_LOGIT_BYTES`) as the backward starts, or all X and dY."""
    per_layer, outside = activation_bytes_per_token(shape, length)
    query = shape.heads * shape.head_width
    kept_inputs = 2 * shape.hidden + query + shape.intermediate
    output_grads = query + 2 * shape.kv_dim + 2 * shape.hidden + 2 * shape.intermediate
    after_backward = shape.layers * BF16_BYTES * (kept_inputs + output_grads) + outside
    backward_start = shape.layers * per_layer + outside + LOSS_BACKWARD_LOGIT_BYTES * shape.vocab
    return sequences * length * max(backward_start, after_backward)


@dataclass(frozen=True)
class ScoreSums:
    """wandg's sums (`--accumulate-dtype`) per GPU: `round_bytes` held during a round (all scored weights when they fit the budget),
    plus the owned sums of earlier rounds; `rounds` = times the passes run."""

    budget: int
    round_bytes: int
    rounds: int
    peak: int


def score_sums(shape: ModelShape, cluster: Cluster, budget: int, element_size: int) -> ScoreSums:
    """As `scoring.accumulation_rounds`: everything in one round when it fits the budget, else rounds of what the
    budget leaves beside the owned sums (1/N of everything); `element_size` bytes per weight."""
    everything = shape.scored_params * element_size
    if everything <= budget:
        return ScoreSums(budget, everything, 1, everything)
    owned = shape.scored_params * owned_bytes(element_size) // cluster.world
    largest_linear = element_size * max(shape.hidden * max(shape.intermediate, shape.heads * shape.head_width),
                                        shape.experts.largest_matrix if shape.experts else 0)
    round_bytes = min(everything, max(budget - owned, largest_linear))
    return ScoreSums(budget, round_bytes, math.ceil(everything / round_bytes), round_bytes + owned)


def score_stage(shape: ModelShape, cluster: Cluster, workload: Workload) -> tuple[StageMemory, ScoreSums]:
    """wandg: bf16 weights without parameter gradients, one pass's activations (`score_pass_activations`), the
    sums."""
    cpu, states = inference_model_states(shape, cluster)
    activations = score_pass_activations(shape, workload.score_batch_size, workload.max_length)
    masks = bitpacked_masks(shape, cluster)
    budget = workload.score_memory
    if budget is None:  # as `score`: half of what is free when scoring starts
        usable = (1 - RESERVED_FRACTION) * cluster.gpu_memory_gib * GIB
        budget = max(int(AUTO_MEMORY_FRACTION * (usable - states - activations - masks)), 0)
    sums = score_sums(shape, cluster, budget, element_bytes(workload.accumulate_dtype, BF16_BYTES))
    return StageMemory("score", states, activations, masks, sums.peak, cpu), sums


def finetune_stage(shape: ModelShape, cluster: Cluster, workload: Workload) -> StageMemory:
    """ZeRO-3 training: DeepSpeed's estimate of the states; the backward's activations, or the optimizer step's
    transient when larger (the two do not overlap); the mask and the saved fp32 values of the frozen entries,
    partitioned. On the host, beside DeepSpeed's figure, the bf16 copy of each rank's partition that `finetune`
    keeps to report the change (`finetune.snapshot`)."""
    cpu, states, _ = zero3_model_states(shape, cluster)
    activations = training_activations(shape, workload.batch_size, workload.max_length,
                                       workload.gradient_checkpointing)
    step = OPTIMIZER_STEP_BYTES * shape.total_params // cluster.world if cluster.offload == "none" else 0
    frozen_values = math.ceil(workload.sparsity_ratio * shape.scored_params * FP32_BYTES / cluster.world)
    start_copy = BF16_BYTES * shape.total_params // cluster.nodes
    return StageMemory("finetune", states, activations, bitpacked_masks(shape, cluster) + frozen_values, 0,
                       cpu + start_copy, step)


def sequence_forward_bytes(shape: ModelShape, length: int) -> int:
    """One bf16 sequence's working set in a no-grad forward (`models.forward_row_bytes`)."""
    from safeneurons.models.structure import forward_row_bytes

    return forward_row_bytes(shape.hidden, shape.intermediate, shape.heads, length, BF16_BYTES,
                             shape.eager_attention)


def trace_stage(shape: ModelShape, cluster: Cluster, workload: Workload) -> StageMemory:
    """One model at a time runs its decoder stack (no vocabulary projection, no cache) over batches of
    `batch_size` × `max_length` tokens and records every layer's gate and up outputs to host memory (fp32, both
    models: the CPU column); then the matching builds the I × I neuron cost matrix in float64 on the device with
    about three such temporaries (measured 3.1 × I² × 8 bytes, after the model is freed). The phases do not
    overlap: the peak is the larger of the two. On a mixture of experts I is every routed expert's units (they are
    matched all together, across experts)."""
    cpu, states = inference_model_states(shape, cluster)
    tokens = workload.batch_size * workload.max_length
    forward = workload.batch_size * sequence_forward_bytes(shape, workload.max_length)
    units = shape.experts.units if shape.experts else shape.intermediate
    cost_matrix = int(COST_MATRIX_COPIES * units ** 2 * 8)
    recorded = 2 * 2 * shape.layers * tokens * units * FP32_BYTES // cluster.nodes
    return StageMemory("trace", states, max(forward, cost_matrix - states), 0, 0, cpu + recorded)


def eval_stage(shape: ModelShape, cluster: Cluster, workload: Workload) -> StageMemory:
    """Evaluation, the largest of its three moments: a generation batch's prefill (the prompts' bf16 KV cache and
    the forward's working set), its last new token (the whole KV cache), and a perplexity batch of the same size
    and length (no cache; full logits: bf16, their fp32 copy, the shifted copy, the log-softmax — 12 bytes per
    vocabulary entry and token — or the layers' working set when larger). Partitioned bf16 parameters plus the
    gathered layer, as every inference stage; a judge model adds its own states."""
    cpu, states = inference_model_states(shape, cluster)
    batch, length = workload.eval_batch_size, workload.max_length
    prefill = kv_cache_bytes(shape, batch, length) + batch * sequence_forward_bytes(shape, length)
    # the cache grows by concatenation: while one layer's keys (or values) are extended they exist twice
    cache = kv_cache_bytes(shape, batch, length + workload.max_new_tokens - 1)
    last_token = cache + cache // (2 * shape.layers)
    perplexity = batch * max(sequence_forward_bytes(shape, length), length * PERPLEXITY_LOGIT_BYTES * shape.vocab)
    return StageMemory("eval", states, max(prefill, last_token, perplexity), 0, 0, cpu)


def patch_stage(shape: ModelShape, cluster: Cluster, workload: Workload) -> StageMemory:
    """Exact patching: the base run's bf16 input to every decoder layer (a batch starts at its lowest patched
    layer; not kept under ZeRO-3, counted anyway), the source run's activations of every component a sweep can
    patch (residual, attn_out, mlp_out: h each; attn_head: the heads' width), and one batch of patched rows of
    `patch_length` tokens — as many as `--batch-size`, or as `patch`'s auto batch fits a quarter of what is
    free (`patching.batch_for`)."""
    from safeneurons.interp.patching.batches import batch_for

    cpu, states = inference_model_states(shape, cluster)
    tokens = workload.patch_length
    layer_inputs = shape.layers * tokens * shape.hidden * BF16_BYTES
    source = shape.layers * tokens * (3 * shape.hidden + shape.heads * shape.head_width) * BF16_BYTES
    row = sequence_forward_bytes(shape, tokens)
    batch = workload.patch_batch_size
    if batch is None:
        free = (1 - RESERVED_FRACTION) * cluster.gpu_memory_gib * GIB - states - layer_inputs - source
        batch = batch_for(row, max(int(free) // 4, 0))
    return StageMemory("patch", states, layer_inputs + source + batch * row, 0, 0, cpu)


def circuit_bytes(shape: ModelShape, workload: Workload, layers: range, last: bool) -> int:
    """`circuit`'s working set on one pair of `patch_length` tokens for decoder layers `layers` (all of them on one
    rank, or a stage's): the larger of EAP-IG's forward and backward of its `ig_steps` sequences with the
    receivers' fp32 gradients and the fp32 differences of every node up to the block's last, and a batch of
    patched rows (`patch_batch_size`, else circuit's default), each holding those differences (on a stage that
    passes them on, a second time: the stack it sends) and the block's forward (interp.circuits)."""
    from safeneurons.interp.circuits.run import CircuitConfig

    defaults = CircuitConfig()
    tokens, per_token = workload.patch_length, shape.hidden * FP32_BYTES
    nodes = 1 + layers.stop * (shape.heads + 1)
    receivers = len(layers) * (shape.heads + 2 * shape.kv_heads + 1) + (1 if last else 0)
    block = replace(shape, layers=len(layers), counted=None)
    scoring = training_activations(block, defaults.ig_steps, tokens) + (receivers + nodes) * tokens * per_token
    copies = 1 if last else 2
    rows = (workload.patch_batch_size or defaults.batch_size) * (copies * nodes * tokens * per_token
                                                                 + sequence_forward_bytes(block, tokens))
    return max(scoring, rows)


def circuit_stage(shape: ModelShape, cluster: Cluster, workload: Workload) -> StageMemory:
    """`circuit` on the whole model, which every rank holds in bf16 (pairs are split across ranks; the model is not
    partitioned): `circuit_bytes` of every layer. `--shard layers` is plan_layers' line."""
    return StageMemory("circuit", BF16_BYTES * shape.total_params,
                       circuit_bytes(shape, workload, range(shape.layers), True), 0, 0, 0)


def plan_stages(shape: ModelShape, cluster: Cluster, workload: Workload) -> list[StageMemory]:
    score, _ = score_stage(shape, cluster, workload)
    finetune = finetune_stage(shape, cluster, workload)
    patch = patch_stage(shape, cluster, workload)
    circuit = circuit_stage(shape, cluster, workload)
    trace = trace_stage(shape, cluster, workload)
    evaluation = eval_stage(shape, cluster, workload)
    return [score, finetune, patch, circuit, trace, evaluation]


def fits(stage: StageMemory, cluster: Cluster) -> bool:
    return stage.total <= (1 - RESERVED_FRACTION) * cluster.gpu_memory_gib * GIB


def remedies(shape: ModelShape, cluster: Cluster, workload: Workload) -> dict[str, list[dict]]:
    """For every stage that does not fit: each change that makes it fit (offload, activation checkpointing, a
    smaller batch, more nodes), with the resulting GiB per GPU; where none does alone, the change that comes
    closest. Each change is applied alone to the given plan."""
    changes = [("--offload optimizer", replace(cluster, offload="optimizer"), workload),
               ("--offload param", replace(cluster, offload="param"), workload),
               ("--gradient-checkpointing", cluster, replace(workload, gradient_checkpointing=True)),
               ("--batch-size 1", cluster, replace(workload, batch_size=1, eval_batch_size=1, patch_batch_size=1)),
               *[(f"--nodes {cluster.nodes * factor}", replace(cluster, nodes=cluster.nodes * factor), workload)
                 for factor in (2, 4, 8)]]
    base = plan_stages(shape, cluster, workload)
    tried = [(label, plan_stages(shape, changed, load), changed) for label, changed, load in changes]
    found: dict[str, list[dict]] = {}
    for index, stage in enumerate(base):
        if fits(stage, cluster):
            continue
        options = [{"change": label, "gib_per_gpu": round(stages[index].total / GIB, 2),
                    "fits": fits(stages[index], changed)} for label, stages, changed in tried
                   if stages[index].total < stage.total]
        working = [option for option in options if option["fits"]]
        found[stage.stage] = working or sorted(options, key=lambda option: option["gib_per_gpu"])[:1]
    return found


def sharded_inputs(shape: ModelShape, cluster: Cluster, workload: Workload) -> ShardedInputs:
    """`--shard layers` with every GPU one stage: equal decoder layers, the embeddings on the first and the final
    norm with the head (a tied head's copy) on the last."""
    embeddings = shape.vocab * shape.hidden
    per_layer = (shape.total_params - embeddings * (1 if shape.tied_embeddings else 2) - shape.hidden) // shape.layers
    return ShardedInputs(
        [per_layer] * shape.layers, embeddings, embeddings + shape.hidden, shape.scored_params_per_layer,
        cluster.world, BF16_BYTES, element_bytes(workload.accumulate_dtype, BF16_BYTES),
        int((1 - RESERVED_FRACTION) * cluster.gpu_memory_gib * GIB), workload.score_memory,
        lambda layers: score_pass_activations(replace(shape, layers=layers, counted=None),
                                              workload.score_batch_size, workload.max_length),
        lambda layers, last: eval_block_bytes(shape, cluster.world, layers, last, workload),
        lambda layers, last: circuit_bytes(shape, workload, layers, last))


def eval_block_bytes(shape: ModelShape, stages: int, layers: int, last: bool, workload: Workload) -> int:
    """A sharded eval stage: its layers' caches for a wave of batches, and eval_stage's working set."""
    batch, length, logits = workload.eval_batch_size, workload.max_length, PERPLEXITY_LOGIT_BYTES * shape.vocab * last
    cache = stages * kv_cache_bytes(replace(shape, layers=layers), batch, length + workload.max_new_tokens - 1)
    return cache + batch * max(sequence_forward_bytes(shape, length), length * logits)  # logits: last stage only


def plan_report(shape: ModelShape, cluster: Cluster, workload: Workload) -> dict:
    stages = plan_stages(shape, cluster, workload)
    sums = score_stage(shape, cluster, workload)[1]
    inputs = sharded_inputs(shape, cluster, workload) if cluster.world <= shape.layers else None
    return {
        "model": asdict(shape), "total_params": shape.total_params, "scored_params": shape.scored_params,
        "active_params": shape.active_params,
        "cluster": {**asdict(cluster), "world_size": cluster.world},
        "workload": asdict(workload), "usable_gib_per_gpu": (1 - RESERVED_FRACTION) * cluster.gpu_memory_gib,
        "stages": [{**asdict(stage), "total": stage.total, "total_gib": stage.total / GIB,
                    "fits": fits(stage, cluster)} for stage in stages],
        "remedies": remedies(shape, cluster, workload),
        "score_sums": {"budget_gib": sums.budget / GIB, "round_gib": sums.round_bytes / GIB, "rounds": sums.rounds,
                       "all_gib": shape.scored_params * element_bytes(workload.accumulate_dtype, BF16_BYTES) / GIB},
        "score_layer_sharded": inputs and sharded_score_report(inputs),
        "eval_layer_sharded": inputs and sharded_eval_report(inputs),
        "circuit_layer_sharded": inputs and sharded_circuit_report(inputs),
    }


def format_table(report: dict) -> str:
    cluster, shape = report["cluster"], report["model"]
    active = (f" ({report['active_params'] / 1e9:.2f}B active: {shape['experts']['top_k']} of "
              f"{shape['experts']['num_experts']} experts)" if shape.get("experts") else "")
    lines = [f"{shape['name']}: {report['total_params'] / 1e9:.2f}B parameters{active} on {cluster['nodes']} x "
             f"{cluster['gpus_per_node']} GPUs of {cluster['gpu_memory_gib']:g} GiB (offload: {cluster['offload']}; "
             f"batch {report['workload']['batch_size']} x {report['workload']['max_length']} tokens per GPU"
             f"{', activation checkpointing' if report['workload']['gradient_checkpointing'] else ''})",
             f"{'stage':<9}{'states':>9}{'activ.':>9}{'step':>9}{'masks':>9}{'scores':>9}{'total':>9}  fits   CPU/node",
             "-" * 83]
    for stage in report["stages"]:
        gib = [stage[key] / GIB for key in ("model_states", "activations", "optimizer_step", "masks", "scores",
                                            "total")]
        lines.append(f"{stage['stage']:<9}" + "".join(f"{value:>9.2f}" for value in gib)
                     + f"  {'yes' if stage['fits'] else 'NO ':<5}{stage['cpu_per_node'] / GIB:>9.1f}")
    sums = report["score_sums"]
    lines.append(f"score: wandg {report['workload']['accumulate_dtype']} sums {sums['all_gib']:.1f} GiB in "
                 f"{'~' if sums['rounds'] > 1 else ''}{sums['rounds']} round"
                 f"{'' if sums['rounds'] == 1 else 's'} of <= {sums['round_gib']:.1f} GiB per GPU (budget "
                 f"{sums['budget_gib']:.1f} GiB{', --score-memory' if report['workload']['score_memory'] else ', auto'})"
                 f"; each round runs the passes once")
    if report["score_layer_sharded"] is not None:
        lines += [sharded_score_line(report["score_layer_sharded"], report["workload"]["accumulate_dtype"]),
                  sharded_eval_line(report["eval_layer_sharded"]),
                  sharded_circuit_line(report["circuit_layer_sharded"])]
    lines.append(f"(GiB per GPU; total = states + the larger of activ. and the optimizer step + masks + scores; fits = "
                 f"total within {report['usable_gib_per_gpu']:.1f} GiB, {RESERVED_FRACTION:.0%} kept for CUDA/NCCL)")
    for stage, options in report["remedies"].items():
        told = "; ".join(f"{option['change']}: {option['gib_per_gpu']:.1f} GiB" for option in options)
        lines.append(f"{stage} fits with {told}" if options and options[0]["fits"] else
                     f"{stage} does not fit with any one change; closest: {told or 'none'}")
    return "\n".join(lines)


@dataclass(frozen=True)
class PlanConfig:
    model: str  # a preset (llama2-7b, …) or a folder with config.json
    cluster: Cluster
    workload: Workload

    def validate(self) -> None:
        sizes = {"nodes": self.cluster.nodes, "gpus_per_node": self.cluster.gpus_per_node,
                 "gpu_memory": self.cluster.gpu_memory_gib, **{name: getattr(self.workload, name) for name in (
                     "batch_size", "max_length", "eval_batch_size", "max_new_tokens", "score_batch_size",
                     "patch_length")}}
        if self.workload.patch_batch_size is not None:  # default: auto
            sizes["patch_batch_size"] = self.workload.patch_batch_size
        for name, value in sizes.items():
            if not value > 0:
                raise SafeneuronsError(f"--{name.replace('_', '-')} is {value}; expected a positive number")
        if not 0 <= self.workload.sparsity_ratio < 1:
            raise SafeneuronsError(f"--sparsity-ratio is {self.workload.sparsity_ratio}; expected a fraction in [0, 1)")


def run_plan(config: PlanConfig, out: str | Path | None = None) -> dict:
    """The memory per GPU of every stage, whether it fits, and what would make it fit; with `out`, also written
    to out/plan.json (an output that cannot be written fails first, before any work)."""
    config.validate()
    if out is not None:
        check_output_dir(out)
    report = plan_report(model_shape(config.model), config.cluster, config.workload)
    if out is not None and discover_launch().rank == 0:
        write_json(Path(out) / "plan.json", report)
    return report
