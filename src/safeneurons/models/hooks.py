"""One naming scheme for the activations that stages read and write, and one base for the hooks that do it.

A site is keyed `(layer, component)` — patching's edits, tracing's recorded activations and every future stage
use the same key, as TransformerLens keys its cache by hook name. The components of decoder layer `layer`:

- `residual`: the layer's output (the residual stream after the layer);
- `attn_out`, `mlp_out`: the attention block's and the MLP block's outputs;
- `attn_head`: the input of `o_proj` (every head's slice side by side; patching edits one head's columns);
- `mlp_neuron`: the input of `down_proj`, act(gate)·up: the MLP's intermediate units, one column a neuron (patching
  edits chosen columns; fused `gate_up_proj` MLPs have the same `down_proj`); on a mixture-of-experts layer every
  expert's units side by side (unit e·intermediate + j is expert e's unit j), each on the tokens routed to it;
- `gate`, `up`: the outputs of the MLP's gate and up projections (their rows of a fused `gate_up_proj`); on a
  mixture-of-experts layer, every routed expert's, each expert applied to every token (routed to it or not) and
  the experts side by side (read only: lineage compares these units);
- on a mixture-of-experts layer (models.moe), `expert_out`: every routed expert's weighted contribution to the MoE
  block's output, side by side (expert e holds columns e·hidden … (e+1)·hidden; patching edits one expert's), and
  `router`: the router's logits, one column an expert — an edit re-routes the tokens by the router's own rule;
- the inputs an edge-level circuit (interp.circuits) patches: `attn_in`, the residual entering the attention block
  (its norm's input; layer 0's is the input embeddings); `q`, `k`, `v`, the outputs of q_proj, k_proj and v_proj
  (one head's, or one key/value head's, columns each); `mlp_in`, the residual entering the MLP (its norm's input).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.models.moe import moe_block
from safeneurons.models.structure import decoder_layers, fused_parts

if TYPE_CHECKING:
    from safeneurons.models.moe import ExpertBank, ExpertObserver, MoeBlock

SiteKey = tuple[int, str]  # (layer, component)
COMPONENTS = ("residual", "attn_out", "mlp_out", "attn_head", "mlp_neuron", "gate", "up", "expert_out", "router",
              "attn_in", "q", "k", "v", "mlp_in")
MOE_COMPONENTS = ("expert_out", "router")
MLP_PROJECTIONS = {"gate": "gate_proj", "up": "up_proj"}
READS_INPUT = ("attn_head", "mlp_neuron", "attn_in", "mlp_in")  # sites that are a module's input, not its output


@dataclass(frozen=True)
class SitePoint:
    """Where a site's activation passes: a module's output (or input), all of it or some of its columns."""

    module: nn.Module
    columns: slice | None  # the component's columns of the module's output (a fused projection); None = all
    reads_input: bool  # the activation is the module's input (attn_head: o_proj's input)
    moe: MoeBlock | None = None  # expert_out, router, an MoE layer's gate/up: the MoE block (module: its experts,
    part: str | None = None  # its router); "gate" or "up" of every expert


def site_point(model: nn.Module, layer: int, component: str) -> SitePoint:
    """The module (and columns) holding `component` of decoder layer `layer`; an error names a bad layer."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SafeneuronsError(f"layer {layer} does not exist; the model has layers 0..{len(layers) - 1}")
    block = layers[layer]
    if component in MOE_COMPONENTS:
        moe = moe_block(block, model.config)
        if moe is None:
            raise SafeneuronsError(f"site component {component} needs routed experts; layer {layer} of "
                                   f"{model.config.model_type!r} has a dense MLP")
        return SitePoint(moe.experts.module if component == "expert_out" else moe.router, None, False, moe)
    moe = moe_block(block, model.config)
    if component in MLP_PROJECTIONS and moe is not None:  # every expert's units, each expert applied to every token
        return SitePoint(moe.experts.module, None, False, moe, component)
    if component == "mlp_neuron" and moe is not None:  # every expert's units, on the tokens routed to it
        return SitePoint(moe.experts.module, None, False, moe, "units")
    if component in MLP_PROJECTIONS:
        separate = getattr(block.mlp, MLP_PROJECTIONS[component], None)
        if separate is not None:
            return SitePoint(separate, None, False)
        return SitePoint(block.mlp.gate_up_proj, fused_parts("mlp.gate_up_proj", model.config)[component], False)
    paths = {"residual": "", "attn_out": "self_attn", "mlp_out": "mlp", "attn_head": "self_attn.o_proj",
             "mlp_neuron": "mlp.down_proj", "attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm",
             "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}
    if component not in paths:
        raise SafeneuronsError(f"site component {component!r} is not one of {', '.join(COMPONENTS)}")
    try:
        module = block.get_submodule(paths[component])
    except AttributeError:
        raise SafeneuronsError(f"site component {component!r}: layer {layer} of {model.config.model_type!r} has no "
                               f"{paths[component]}") from None
    return SitePoint(module, None, component in READS_INPUT)


def output_width(point: SitePoint) -> int:
    """The number of values the site holds per token."""
    if point.columns is not None:
        return point.columns.stop - point.columns.start
    if point.moe is not None:
        experts = point.moe.experts
        if point.part is not None:  # gate, up, units
            return experts.num_experts * experts.intermediate
        return experts.num_experts * (experts.hidden if point.module is experts.module else 1)
    return point.module.in_features if point.reads_input else point.module.out_features


def replace_first(value: Any, edit: Callable[[Any], Any]) -> Any:
    """Modules take and return a tensor or a tuple whose first element is the activation (attention, GPT-OSS's
    MoE block): `edit` applied to it."""
    if isinstance(value, tuple):
        return (edit(value[0]), *value[1:])
    return edit(value)


class Hooks:
    """Forward hooks on modules, all removed together by `close()` or on leaving a `with` block: the base of every
    recorder and editor, and of the experts' replaced forwards (scoring's captures, ActSVD's Grams, tracing's
    recorder, patching's edits)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.replaced = contextlib.ExitStack()  # experts' forwards replaced by `ExpertBank.observed`, `.replaced`
        self.experts_edits: dict[int, dict[str, Callable[[Any], Any]]] = {}  # per experts module: its site edits

    def on_output(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """`hook(module, args, output)`; a value it returns replaces the output."""
        self.handles.append(module.register_forward_hook(hook))

    def on_input(self, module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> None:
        """`hook(module, args[, kwargs])` before the module runs; a value it returns replaces the input."""
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def on_site(self, point: SitePoint, hook: Callable[..., Any]) -> None:
        """`hook(module, args, output)` on an output site, `hook(module, args)` on an input site."""
        (self.on_input if point.reads_input else self.on_output)(point.module, hook)

    def on_edit(self, point: SitePoint, edit: Callable[[Any], Any]) -> None:
        """`edit(activation)` rewrites the site's activation in every forward."""
        if point.moe is not None:
            self.on_moe_site(point, edit)
        elif point.reads_input:
            self.on_input(point.module, lambda _module, args: replace_first(args, edit))
        else:
            self.on_output(point.module, lambda _module, _args, output: replace_first(output, edit))

    def on_units(self, model: nn.Module, layer: int, record: Callable[[Any], None]) -> None:
        """`record(units)` in every forward with the MLP units of decoder layer `layer`, [batch, tokens, units]: a
        dense MLP's down_proj input; on an MoE layer every expert's units on every token, routed to it or not
        (expert e's unit j at column e·intermediate + j, as `mlp_neuron` edits them)."""
        point = site_point(model, layer, "mlp_neuron")
        if point.moe is None:
            self.on_input(point.module, lambda _module, args: record(args[0]))
            return
        shape = self._token_shape(point.moe)
        self.on_input(point.module, lambda _module, args: record(
            point.moe.experts.every_unit(args[0], args[1]).reshape(*shape["tokens"], -1)))

    def _token_shape(self, moe: MoeBlock) -> dict[str, Any]:
        """Kept up to date in every forward: `["tokens"]`, the [batch, tokens] shape of the MoE block's input (its
        router and experts see the tokens flattened)."""
        shape: dict[str, Any] = {}
        self.on_input(moe.module, lambda _module, args: shape.__setitem__("tokens", args[0].shape[:-1]))
        return shape

    def on_moe_site(self, point: SitePoint, edit: Callable[[Any], Any]) -> None:
        """`edit` rewrites an MoE site's activation, [batch, tokens, features]: `expert_out`, every expert's
        weighted contribution side by side (summed again afterwards); `mlp_neuron`, every expert's units on the
        tokens routed to it (ExpertBank.edited_forward); `router`, the logits (the tokens then re-routed). The
        experts' edits of one layer run in one replaced forward."""
        moe, shape = point.moe, self._token_shape(point.moe)

        def on_tokens(activation: Any) -> Any:  # the edit sees [batch, tokens, features]
            return edit(activation.reshape(*shape["tokens"], -1)).reshape(activation.shape)
        if point.module is moe.router:
            def router(_module: nn.Module, _args: tuple, output: tuple) -> tuple:
                edited = on_tokens(output[0])
                return output if edited is output[0] else moe.route(edited)
            self.on_output(point.module, router)
            return
        edits = self.experts_edits.get(id(moe.experts.module))
        if edits is None:  # in place of the forward: the weights are there (ZeRO-3)
            edits = self.experts_edits[id(moe.experts.module)] = {}
            self.replaced.enter_context(moe.experts.replaced(
                lambda hidden, index, weights: moe.experts.edited_forward(hidden, index, weights, edits.get("units"),
                                                                          edits.get("contributions"))))
        edits["units" if point.part == "units" else "contributions"] = on_tokens

    def on_experts(self, bank: ExpertBank, observe: ExpertObserver,
                   group_rows: Callable[[], int | None] = lambda: None) -> None:
        """`observe(expert, tokens, inputs, gate_up, inner, out)` on every expert the experts module runs (on each
        sequence's tokens apart when `group_rows()` gives the tokens of a sequence); a value it returns replaces
        that expert's output (before the routing weight)."""
        self.replaced.enter_context(bank.observed(observe, group_rows))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.replaced.close()
        self.experts_edits.clear()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()
