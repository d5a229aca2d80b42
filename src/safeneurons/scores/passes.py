"""Forward and backward passes over calibration micro-batches, with hooks that keep each Linear's
input X and output gradient dY.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from safeneurons.data.examples import IGNORE_INDEX
from safeneurons.models.hooks import Hooks
from safeneurons.models.structure import decoder_layers, layers_from
from safeneurons.runtime import distributed
from safeneurons.scores.accumulators import FixedPointSum

if TYPE_CHECKING:
    from safeneurons.data.examples import Sample
    from safeneurons.models.moe import ExpertBank, ExpertObserver
    from safeneurons.scores.accumulators import Accumulator
    from safeneurons.scores.config import Target


ROUTED_TOKENS = ":routed_tokens"  # suffix of the key that holds how many response tokens each expert received


def routed_tokens_key(name: str) -> str:
    """The statistics' key of the response-token counts per expert of an experts' gate_up matrix `name`."""
    return name + ROUTED_TOKENS


@dataclass
class RoutedRows:
    """What one expert's slice of an experts' matrix saw of one sequence in a pass: the sequence's tokens routed to
    the expert (flat indices over batch × length), the matrix's input on them and, after backward, the gradient of
    its output."""

    expert: int
    tokens: torch.Tensor
    inputs: torch.Tensor
    output_grad: torch.Tensor | None = None


class LinearCapture(Hooks):
    """Hooks on the target matrices: each pass's inputs X and, when gradients are wanted, output gradients dY of a
    Linear or a router (its logits); for an experts' matrix a list of `RoutedRows`, one per expert and sequence (the
    experts run `ExpertBank.routed_forward` one sequence at a time); and the response tokens each expert received
    (`routed_tokens`)."""

    def __init__(self, targets: Sequence[Target], with_grads: bool) -> None:
        super().__init__()
        self.with_grads = with_grads
        self.inputs: dict[str, torch.Tensor | list[RoutedRows]] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self.routed_tokens: dict[str, torch.Tensor] = {}
        self.responses = torch.zeros(0, dtype=torch.bool)
        self.length = 0
        banks: dict[int, tuple[ExpertBank, dict[str, str]]] = {}
        for target in targets:
            bank = target.linear.experts
            if bank is None:
                self.on_output(target.linear.module, self._hook(target.name))
            else:
                banks.setdefault(id(bank.module), (bank, {}))[1][target.linear.expert_matrix] = target.name
        for bank, names in banks.values():
            if with_grads:
                self.on_input(bank.module, _input_requiring_grad)
            if "gate_up" in names:
                self.routed_tokens[names["gate_up"]] = torch.zeros(bank.num_experts, dtype=torch.int64,
                                                                   device=bank.matrix("gate_up").device)
            self.on_experts(bank, self._expert_hook(names), lambda: self.length)

    def _hook(self, name: str):
        def keep(_module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            output = output[0] if isinstance(output, tuple) else output  # a router returns its logits first
            self.inputs[name] = args[0].detach()
            if self.with_grads:
                if not output.requires_grad:  # a lowest scored Linear: its output is where backward stops
                    output.requires_grad_(True)
                output.register_hook(lambda grad: self.output_grads.__setitem__(name, grad.detach()))
        return keep

    def _expert_hook(self, names: Mapping[str, str]) -> ExpertObserver:
        def keep(expert: int, tokens: torch.Tensor, inputs: torch.Tensor, gate_up: torch.Tensor,
                 inner: torch.Tensor, out: torch.Tensor) -> None:
            counts = self.routed_tokens.get(names.get("gate_up", ""))
            if counts is not None:
                counts[expert] += self.responses[tokens.to(self.responses.device)].sum().to(counts.device)
            for which, x, y in (("gate_up", inputs, gate_up), ("down", inner, out)):
                if which not in names:
                    continue
                rows = RoutedRows(expert, tokens, x.detach())
                self.inputs.setdefault(names[which], []).append(rows)
                if self.with_grads:
                    y.register_hook(lambda grad, rows=rows: setattr(rows, "output_grad", grad.detach()))
        return keep

    def start(self, batch: MicroBatch) -> None:
        """Before each forward pass: forget the last pass's tensors (new objects: a pipeline keeps those of passes
        still in flight); count the routed tokens of `batch`'s real response rows."""
        self.inputs = {}
        self.output_grads.clear()
        self.responses = batch.response_rows.reshape(-1)
        self.length = batch.input_ids.shape[1]


def _input_requiring_grad(_module: nn.Module, args: tuple) -> tuple:
    """The experts' input made a leaf that requires grad when nothing below it does (the lowest scored matrices),
    so that every expert's intermediate tensors carry gradients."""
    if args[0].requires_grad:
        return args
    return (args[0].detach().requires_grad_(True), *args[1:])


def squared_input_sum(inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ over one sample's selected token rows (its response tokens) of x_j² (fp32), one value per column."""
    return inputs[rows.to(inputs.device)].float().pow(2).sum(dim=0)


def abs_weight_gradient(inputs: torch.Tensor, output_grad: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """|∂L/∂W| of one sample from the Linear's input X and output gradient dY: |Σ_tokens dY^T X|, computed in
    `dtype` (fp32, or the model's dtype as autograd's weight gradient is)."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(dtype)
    dy = output_grad.reshape(-1, output_grad.shape[-1]).to(dtype)
    return (dy.T @ x).abs_()


def sample_terms(inputs: Mapping[str, torch.Tensor | list[RoutedRows]], output_grads: Mapping[str, torch.Tensor],
                 target: Target, batch: MicroBatch, with_grads: bool, dtype: torch.dtype, only: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, int | None, int]]:
    """Each real sample's |∂L_s/∂W| (wandg) or Σ x_j² over its response tokens (wanda), from one pass's captured
    inputs and output gradients, as (term, expert or None, the sample's row in the batch); `only` one row's. The
    gradient is missing when the loss does not depend on the matrix."""
    if target.linear.experts is not None:
        yield from _expert_terms(inputs, target, batch, with_grads, dtype, only)
        return
    name = target.name
    output_grad = output_grads.get(name)
    if with_grads and output_grad is None:
        return
    shape = (*batch.input_ids.shape, -1)  # a router sees the tokens flattened
    for row in batch.real.nonzero().flatten().tolist():
        if only is not None and row != only:
            continue
        if with_grads:
            yield abs_weight_gradient(inputs[name].reshape(shape)[row], output_grad.reshape(shape)[row], dtype), None, row
        else:
            yield squared_input_sum(inputs[name].reshape(shape)[row], batch.response_rows[row]), None, row


def _expert_terms(inputs: Mapping[str, torch.Tensor | list[RoutedRows]], target: Target, batch: MicroBatch,
                  with_grads: bool, dtype: torch.dtype, only: int | None
                  ) -> Iterator[tuple[torch.Tensor, int | None, int]]:
    """The terms of each expert's slice of an experts' matrix from the tokens of a real sample routed to it: |dY^T X|
    (wandg; in the matrix's stored layout), or Σ x_j² over its response tokens among them (wanda)."""
    bank = target.linear.experts
    responses = batch.response_rows.reshape(-1)
    for rows in inputs.get(target.name, []):
        row = int(rows.tokens[0]) // batch.input_ids.shape[1]
        if not batch.real[row] or (only is not None and row != only):
            continue
        if with_grads:
            if rows.output_grad is not None:  # canonical [out, in] back to the stored layout
                yield bank.canonical(abs_weight_gradient(rows.inputs, rows.output_grad, dtype)), rows.expert, row
            continue
        chosen = responses[rows.tokens]
        if chosen.any():
            yield rows.inputs[chosen].float().pow(2).sum(dim=0), rows.expert, row


def add_sample_terms(total: Accumulator, inputs: Mapping[str, torch.Tensor | list[RoutedRows]],
                     output_grads: Mapping[str, torch.Tensor], target: Target, batch: MicroBatch, with_grads: bool,
                     dtype: torch.dtype) -> None:
    """`total` += each real sample's term (`sample_terms`)."""
    for term, expert, _ in sample_terms(inputs, output_grads, target, batch, with_grads, dtype):
        total.add(term, expert)


def first_sample_largest(shape: Sequence[int], inputs: Mapping[str, torch.Tensor | list[RoutedRows]],
                         output_grads: Mapping[str, torch.Tensor], target: Target, batch: MicroBatch,
                         with_grads: bool, dtype: torch.dtype) -> torch.Tensor:
    """Per row of the statistic (`shape`: its dimensions but the last) the largest term of the batch's first
    sample, 0 where it has none: the reference of fixed-point sums (scores.accumulators)."""
    largest = torch.zeros(tuple(shape), device=batch.input_ids.device)
    for term, expert, _ in sample_terms(inputs, output_grads, target, batch, with_grads, dtype, only=0):
        row_largest = term.float().amax(dim=-1).to(largest.device)
        if expert is None:
            largest = row_largest
        else:
            largest[expert] = row_largest
    return largest


def first_sample_references(sums: Mapping[str, Accumulator], inputs: Mapping[str, torch.Tensor | list[RoutedRows]],
                            output_grads: Mapping[str, torch.Tensor], targets: Sequence[Target], batch: MicroBatch,
                            with_grads: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`first_sample_largest` of every target whose sum is fixed-point, from one pass's captured tensors."""
    return {target.name: first_sample_largest(sums[target.name].reference_shape, inputs, output_grads, target, batch,
                                              with_grads, dtype)
            for target in targets if isinstance(sums[target.name], FixedPointSum)}


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients (`LinearCapture` makes the activations that backward needs require
    grad, so it computes no weight gradient and stops at the lowest scored Linears)."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    was_training = model.training
    for param, _ in flags:
        param.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


@dataclass
class MicroBatch:
    """Samples of one length; `real` is False for the dummy samples that keep the ranks' pass counts equal."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    real: torch.Tensor

    @property
    def response_rows(self) -> torch.Tensor:
        """Token positions whose statistics count: response tokens of real samples."""
        return (self.labels != IGNORE_INDEX) & self.real[:, None]


def rank_batches(samples: Sequence[Sample], batch_size: int, device: torch.device) -> list[MicroBatch]:
    """This rank's samples (round-robin) in micro-batches of at most `batch_size` samples of one length, and
    dummy batches that give every rank the same number of passes (ZeRO-3 gathers weights collectively inside
    every pass). A batch never pads: padding changes the kernels' summation order, so a sample's statistics would
    depend on its batch-mates; without it they are the same bit for bit at any batch size and rank count."""
    groups = [equal_length_groups(distributed.split_evenly(samples, rank, distributed.world_size()), batch_size)
              for rank in range(distributed.world_size())]
    mine = groups[distributed.rank()]
    dummies = [[(samples[0], False)]] * (max(len(rank_groups) for rank_groups in groups) - len(mine))
    return [micro_batch(group, device) for group in mine + dummies]


def equal_length_groups(samples: Sequence[Sample], batch_size: int) -> list[list[tuple[Sample, bool]]]:
    """The samples in chunks of at most `batch_size` samples of one token count, flagged real, in the order of
    their first samples: batches of 1 keep the samples' order (running sums depend on it), and the first sample
    always leads the first chunk (fixed-point sums take their units from it)."""
    filling: dict[int, list[tuple[int, Sample]]] = {}
    chunks = []
    for position, sample in enumerate(samples):
        chunk = filling.setdefault(len(sample.input_ids), [])
        chunk.append((position, sample))
        if len(chunk) == batch_size:
            chunks.append(filling.pop(len(sample.input_ids)))
    ordered = sorted(chunks + list(filling.values()), key=lambda chunk: chunk[0][0])
    return [[(sample, True) for _, sample in chunk] for chunk in ordered]


def micro_batch(group: Sequence[tuple[Sample, bool]], device: torch.device) -> MicroBatch:
    return MicroBatch(torch.stack([sample.input_ids for sample, _ in group]).to(device),
                      torch.stack([sample.labels for sample, _ in group]).to(device),
                      torch.tensor([real for _, real in group], device=device))


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T−1]: −log p of each next-token label in float32, 0 where the label is ignored."""
    targets = labels[:, 1:]
    # The flattened [tokens, vocab] form, as HF's loss: its fp32 gradient is about 10x closer to float64 than that
    # of cross_entropy over a transposed [batch, vocab, tokens] tensor.
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's mean next-token loss over its response tokens (HF's causal-LM loss, one sample at a time)."""
    return next_token_losses(logits, labels).sum(dim=1) / (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)


@dataclass
class Entry:
    """The hidden states entering decoder layer `layer`, for one micro-batch: a pass can start there."""

    layer: int
    hidden: torch.Tensor


def _forward(model: nn.Module, batch: MicroBatch, entry: Entry | None, stop: int | None = None,
             **kwargs: Any) -> Any:
    """The model on a micro-batch, from the embeddings or from `entry`, through layer `stop` − 1 (default all).
    Micro-batches are never padded, so no attention mask is passed: attention takes its causal fast path, as in
    the original code."""
    inputs = {"input_ids": batch.input_ids} if entry is None else {"inputs_embeds": entry.hidden}
    if entry is None and stop is None:
        return model(**inputs, use_cache=False, **kwargs)
    with layers_from(model, 0 if entry is None else entry.layer, stop):
        return model(**inputs, use_cache=False, **kwargs)


def run_batch(model: nn.Module, batch: MicroBatch, with_grads: bool, entry: Entry | None = None) -> None:
    """One forward pass (from `entry` when given: the layers below it are not run again), and with `with_grads`
    one backward of Σ_real samples (sample's mean loss): the samples of a batch do not interact, so each
    sample's activation gradients are those of its own loss."""
    if not with_grads:
        with torch.no_grad():
            _forward(model, batch, entry)
        return
    with torch.enable_grad():
        logits = _forward(model, batch, entry).logits
        (per_sample_losses(logits, batch.labels) * batch.real).sum().backward()


def next_entries(model: nn.Module, batches: Sequence[MicroBatch], entries: Sequence[Entry] | None,
                 layer: int) -> list[Entry]:
    """The hidden states entering layer `layer` + 1 of every micro-batch: layer `layer` alone, run on its own
    entries (or on the embeddings for layer 0)."""
    found = []
    for index, batch in enumerate(batches):
        kept: dict[str, torch.Tensor] = {}
        with Hooks() as hooks, torch.no_grad():
            hooks.on_output(decoder_layers(model)[layer], lambda _m, _a, output: kept.__setitem__(
                "h", (output[0] if isinstance(output, tuple) else output)))
            _forward(model, batch, None if entries is None else entries[index], layer + 1, logits_to_keep=1)
        found.append(Entry(layer + 1, kept["h"].detach()))
    return found
