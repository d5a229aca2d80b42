"""Mixture-of-experts layers, recognised by structure as dense ones are: the one description of an MoE block that
every stage reads (scoring, masks and freezing, ActSVD, the direction, patching, lineage, the neuron study, plan).

An MoE block sits where a dense layer has its MLP (`mlp`) and has
- a router: `mlp.gate` or `mlp.router`, a module with `weight` [E, hidden] (and maybe `bias`) that returns the router
  logits first (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS); it is scored as a Linear;
- routed experts, `mlp.experts`, stored as fused 3-D parameters as transformers 5 stores them: `gate_up_proj`
  (gate and up side by side, or interleaved as in GPT-OSS) and `down_proj`, with biases where the family has them.
  Whether a matrix is stored [E, out, in] (the forward applies `F.linear(x, W[e])`) or transposed [E, in, out]
  (`x @ W[e]`, GPT-OSS) is read from the module, where transformers records how its forward uses the weights;
- optional shared experts (Qwen2-MoE's `shared_expert` and its sigmoid `shared_expert_gate`, DeepSeek's
  `shared_experts`): dense MLPs of Linears, scored and masked like any MLP.
Dense MLP layers may sit between MoE layers (Qwen3-MoE's `mlp_only_layers`, DeepSeek's first layers).

`ExpertBank.routed_forward` is the experts' eager forward written once for every family (the same operations in the
same order, so it equals the family's own eager forward bit for bit), with a hook per expert: the stages that read
what one expert computes (scoring's inputs and gradients, ActSVD's Grams) run it in place of the module's forward;
`ExpertBank.edited_forward` is the same forward with every expert's units or weighted contributions editable
(patching's `mlp_neuron` and `expert_out`), and `MoeBlock.route` re-routes given logits by the router's own rule.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from safeneurons.errors import SafeneuronsError
from safeneurons.runtime.zero3 import full_shape

ROUTER_ATTRIBUTES = ("gate", "router")
SHARED_EXPERT_ATTRIBUTES = ("shared_expert", "shared_experts")
SHARED_GATE_ATTRIBUTE = "shared_expert_gate"
EXPERT_MATRICES = ("gate_up", "down")  # the fused parameters `experts.{gate_up,down}_proj`, in data order
EXPECTED_MOE_LAYOUT = ("an MoE block at mlp: a router mlp.gate or mlp.router (weight [experts, hidden]), routed "
                       "experts mlp.experts with fused 3-D gate_up_proj and down_proj (biases optional), optional "
                       "shared experts mlp.shared_expert(s) with gate/up/down_proj Linears")

# An expert's hook: (expert, token rows, its input, its gate_up output, its down input, its output before the
# routing weight) → the output to use (None keeps it).
ExpertObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                          "torch.Tensor | None"]


@dataclass(frozen=True)
class ExpertBank:
    """The routed experts of one MoE block, E expert MLPs stored as fused 3-D parameters."""

    module: nn.Module
    num_experts: int
    hidden: int
    intermediate: int
    transposed: bool  # stored [E, in, out]: the forward computes x @ W[e]
    interleaved: bool  # gate_up rows alternate gate, up (GPT-OSS) instead of [gate; up]

    def matrix(self, which: str) -> nn.Parameter:
        return getattr(self.module, f"{which}_proj")

    def bias(self, which: str) -> nn.Parameter | None:
        return getattr(self.module, f"{which}_proj_bias", None)

    def canonical(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like an expert matrix, viewed [E, out, in] whatever the storage (the inverse too)."""
        return tensor.transpose(-1, -2) if self.transposed else tensor

    def gate_up_rows(self, part: str) -> slice:
        """The canonical rows of `gate_up_proj` that hold `part` ("gate" or "up") of every intermediate unit."""
        first = 0 if part == "gate" else 1
        if self.interleaved:
            return slice(first, 2 * self.intermediate, 2)
        return slice(first * self.intermediate, (first + 1) * self.intermediate)

    def project(self, which: str, inputs: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert`'s `which` matrix (and bias) applied to `inputs` exactly as the family's forward does."""
        weight, bias = self.matrix(which)[expert], self.bias(which)
        if self.transposed:
            out = inputs @ weight
            return out if bias is None else out + bias[expert]
        return F.linear(inputs, weight, None if bias is None else bias[expert])

    def every_expert(self, hidden: torch.Tensor, part: str) -> torch.Tensor:
        """[tokens, E × intermediate]: `part` ("gate" or "up") of every expert's gate_up output on every token, the
        experts side by side (what lineage compares: all the units of the layer on the same tokens)."""
        rows = self.gate_up_rows(part)
        return torch.cat([self.project("gate_up", hidden, expert)[:, rows] for expert in range(self.num_experts)],
                         dim=-1)

    def every_unit(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """[tokens, E × intermediate]: every expert's units, act(gate)·up, on every token. Each expert runs the
        tokens routed to it as the forward does (the same rows together: the same values bit for bit) and the
        others apart."""
        routed = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        width = self.intermediate
        units = hidden.new_empty(hidden.shape[0], self.num_experts * width)
        for expert in range(self.num_experts):
            tokens = torch.where(routed[expert])[1]
            others = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            others[tokens] = False
            for rows in (tokens, others.nonzero().flatten()):
                if rows.numel():
                    units[rows, expert * width:(expert + 1) * width] = self.module._apply_gate(
                        self.project("gate_up", hidden[rows], expert)).to(units.dtype)
        return units

    def routed_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       observe: ExpertObserver | None = None, group_rows: int | None = None) -> torch.Tensor:
        """Σ over each token's chosen experts of routing weight × expert output, expert by expert in index order (as
        transformers' eager loop: bit for bit the family's forward); `observe` sees each expert's tensors and may
        replace its output. With `group_rows` (the tokens of one sequence) each expert runs each sequence's tokens
        on their own: a kernel's result for a row can depend on how many rows it is given, so this makes each
        sequence's values independent of its batch-mates (scoring's batches equal single samples, bit for bit)."""
        final = torch.zeros_like(hidden)
        with torch.no_grad():
            routed = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit.flatten().tolist():
            if expert == self.num_experts:
                continue
            slot, tokens = torch.where(routed[expert])
            groups = [slice(None)] if group_rows is None else [
                tokens // group_rows == sequence for sequence in (tokens // group_rows).unique().tolist()]
            for group in groups:
                final.index_add_(0, tokens[group], self._expert(expert, hidden, tokens[group], slot[group],
                                                                top_k_weights, observe).to(final.dtype))
        return final

    def _expert(self, expert: int, hidden: torch.Tensor, tokens: torch.Tensor, slot: torch.Tensor,
                top_k_weights: torch.Tensor, observe: ExpertObserver | None) -> torch.Tensor:
        """One expert on its tokens, weighted by their routing weights."""
        inputs = hidden[tokens]
        gate_up = self.project("gate_up", inputs, expert)
        inner = self.module._apply_gate(gate_up)
        out = self.project("down", inner, expert)
        if observe is not None:
            replaced = observe(expert, tokens, inputs, gate_up, inner, out)
            out = out if replaced is None else replaced
        return out * top_k_weights[tokens, slot, None]

    def edited_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       edit_units: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       edit_contributions: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The experts' output with their units or contributions edited; unedited, the eager forward bit for bit.

        `edit_units` rewrites [tokens, E × intermediate]: each expert's act(gate)·up on the tokens routed to it
        (zero elsewhere; an edit reaches an expert only on its own tokens). `edit_contributions` rewrites
        [tokens, E × hidden]: each expert's weighted output (zero where the token did not choose it), which is
        then summed over experts in index order (adding zeros is exact)."""
        routed = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        chosen = {expert: torch.where(routed[expert]) for expert in range(self.num_experts)}
        chosen = {expert: found for expert, found in chosen.items() if found[1].numel()}
        width = self.intermediate
        units = {expert: self.module._apply_gate(self.project("gate_up", hidden[tokens], expert))
                 for expert, (_, tokens) in chosen.items()}
        if edit_units is not None:
            every = hidden.new_zeros(hidden.shape[0], self.num_experts * width)
            for expert, (_, tokens) in chosen.items():
                every[tokens, expert * width:(expert + 1) * width] = units[expert].to(every.dtype)
            every = edit_units(every)
            units = {expert: every[tokens, expert * width:(expert + 1) * width]
                     for expert, (_, tokens) in chosen.items()}
        outputs = {expert: self.project("down", units[expert], expert) * top_k_weights[tokens, slot, None]
                   for expert, (slot, tokens) in chosen.items()}
        if edit_contributions is None:
            final = torch.zeros_like(hidden)
            for expert, (_, tokens) in chosen.items():
                final.index_add_(0, tokens, outputs[expert].to(final.dtype))
            return final
        stacked = hidden.new_zeros(hidden.shape[0], self.num_experts, hidden.shape[1])
        for expert, (_, tokens) in chosen.items():
            stacked[tokens, expert] = outputs[expert].to(stacked.dtype)
        stacked = edit_contributions(stacked.reshape(hidden.shape[0], -1)).reshape(stacked.shape)
        total = torch.zeros_like(hidden)
        for expert in range(self.num_experts):
            total = total + stacked[:, expert]
        return total

    @contextlib.contextmanager
    def observed(self, observe: ExpertObserver, group_rows: Callable[[], int | None] = lambda: None
                 ) -> Iterator[None]:
        """While active, the experts module runs `routed_forward` with `observe` (and `group_rows()` at each call)."""
        def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
            return self.routed_forward(hidden, top_k_index, top_k_weights, observe, group_rows())

        with self.replaced(forward):
            yield

    @contextlib.contextmanager
    def replaced(self, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                 ) -> Iterator[None]:
        """While active, the experts module's forward is `forward(hidden, top_k_index, top_k_weights)`: inside the
        module's call, so its hooks (ZeRO-3 gathering the weights) still run around it."""
        self.module.forward = forward
        try:
            yield
        finally:
            del self.module.forward


@dataclass(frozen=True)
class MoeBlock:
    """One decoder layer's MoE block: router, routed experts, shared experts (if any)."""

    module: nn.Module  # the layer's `mlp`
    router: nn.Module
    router_name: str  # "mlp.gate" or "mlp.router"
    experts: ExpertBank
    shared: nn.Module | None  # the shared experts' MLP
    shared_name: str | None  # "mlp.shared_expert" or "mlp.shared_experts"
    shared_gate: nn.Linear | None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    def route(self, logits: torch.Tensor) -> tuple:
        """The router's own decision (its forward's outputs: logits, weights, chosen experts) from given logits: its
        forward run with an identity weight and zero bias on them, so every family keeps its own softmax, top-k and
        renormalisation (multiplying by the identity is exact). The forward is called directly, without the
        module's hooks (a patching hook on the router is what calls this)."""
        experts = logits.shape[-1]
        saved, width = dict(self.router._parameters), getattr(self.router, "hidden_dim", None)
        self.router._parameters["weight"] = torch.eye(experts, dtype=logits.dtype, device=logits.device)
        if isinstance(saved.get("bias"), torch.Tensor):
            self.router._parameters["bias"] = torch.zeros(experts, dtype=logits.dtype, device=logits.device)
        if width is not None:  # routers flatten their input to [tokens, hidden_dim]
            self.router.hidden_dim = experts
        try:
            return self.router.forward(logits)
        finally:
            self.router._parameters.update(saved)
            if width is not None:
                self.router.hidden_dim = width


def _dimension(config: Any, *names: str) -> int | None:
    return next((int(getattr(config, name)) for name in names if getattr(config, name, None)), None)


def _expert_bank(experts: nn.Module, config: Any, family: str) -> ExpertBank:
    """The experts' layout from the module (transformers records it there) and the shapes; an unknown layout is
    refused in one line naming the family."""
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
            and len(full_shape(gate_up)) == len(full_shape(down)) == 3 and hasattr(experts, "_apply_gate")):
        raise SafeneuronsError(f"model family {family!r}: its experts module {type(experts).__name__} is not a layout "
                               f"safeneurons reads; expected {EXPECTED_MOE_LAYOUT}")
    if getattr(experts, "has_post_expert_norm", False) or not getattr(experts, "has_gate", True):
        raise SafeneuronsError(f"model family {family!r}: experts with a post-expert norm or without a gate are not "
                               f"supported; expected {EXPECTED_MOE_LAYOUT}")
    hidden = _dimension(config, "hidden_size")
    shape, down_shape = full_shape(gate_up), full_shape(down)  # (whole, under ZeRO-3 too)
    count = shape[0]
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:  # not recorded: the shapes decide, when they can
        if shape[1] == shape[2]:
            raise SafeneuronsError(f"model family {family!r}: cannot tell the orientation of the square experts "
                                   f"matrices {shape}; expected {EXPECTED_MOE_LAYOUT}")
        transposed = shape[1] == hidden
    width = shape[2] if transposed else shape[1]
    expected_down = (count, width // 2, hidden) if transposed else (count, hidden, width // 2)
    if down_shape != expected_down or width % 2:
        raise SafeneuronsError(f"model family {family!r}: experts down_proj {down_shape} does not match "
                               f"gate_up_proj {shape}; expected {EXPECTED_MOE_LAYOUT}")
    return ExpertBank(experts, count, hidden or 0, width // 2, bool(transposed),
                      not getattr(experts, "is_concatenated", True))


def moe_block(layer: nn.Module, config: Any = None) -> MoeBlock | None:
    """The layer's MoE block, or None for a layer whose `mlp` has no routed experts (a dense layer)."""
    mlp = getattr(layer, "mlp", None)
    experts = getattr(mlp, "experts", None)
    if experts is None:
        return None
    family = getattr(config, "model_type", None) or type(layer).__name__
    router_name = next((name for name in ROUTER_ATTRIBUTES
                        if isinstance(getattr(getattr(mlp, name, None), "weight", None), nn.Parameter)), None)
    if router_name is None:
        raise SafeneuronsError(f"model family {family!r}: its MoE block has no router at mlp.gate or mlp.router; "
                               f"expected {EXPECTED_MOE_LAYOUT}")
    bank = _expert_bank(experts, config, family)
    router = getattr(mlp, router_name)
    if full_shape(router.weight) != (bank.num_experts, bank.hidden):
        raise SafeneuronsError(f"model family {family!r}: router weight {full_shape(router.weight)} is not "
                               f"[experts, hidden] = [{bank.num_experts}, {bank.hidden}]")
    shared_name = next((name for name in SHARED_EXPERT_ATTRIBUTES if getattr(mlp, name, None) is not None), None)
    shared_gate = getattr(mlp, SHARED_GATE_ATTRIBUTE, None)
    return MoeBlock(mlp, router, f"mlp.{router_name}", bank, None if shared_name is None else getattr(mlp, shared_name),
                    None if shared_name is None else f"mlp.{shared_name}",
                    shared_gate if isinstance(shared_gate, nn.Linear) else None)


def moe_blocks(layers: nn.ModuleList, config: Any = None) -> dict[int, MoeBlock]:
    """The MoE blocks of a model's decoder layers, by layer index (dense layers absent)."""
    found = {index: moe_block(layer, config) for index, layer in enumerate(layers)}
    return {index: block for index, block in found.items() if block is not None}


