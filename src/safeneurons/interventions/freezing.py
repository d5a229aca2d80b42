"""Freeze safety-critical weights: masked elements keep their exact value through every optimizer step.

Zeroing gradients is not enough (AdamW's weight decay and Adam moments still move a weight whose gradient is 0),
so the mechanism acts in two places around the step of the optimizer that owns the weights:

* before the step, the masked entries of the gradient are zeroed, so gradient clipping sees only free weights
  (single process, DDP-free loops and ZeRO 0-2: a gradient hook on each parameter; ZeRO-3: the local fp32
  gradient partition, `deepspeed.utils.safe_get_local_grad` / `safe_set_local_grad`);
* after the step, the saved original values of the masked entries are written back into every copy of the
  weights the optimizer updates: the parameter itself (ZeRO-3: `param.ds_tensor`, the local partition), and
  the fp32 master copy (ZeRO-3: `safe_get_local_fp32_param` / `safe_set_local_fp32_param`; ZeRO 1-2 and the bf16
  optimizer: the `_hp_mapping` fragment this rank owns; bf16 without ZeRO: FP16_UnfusedOptimizer's fp32 copy).

The step is wrapped on the optimizer object itself (`FrozenWeights.attach`), so the guarantee holds whoever
calls it: a plain loop, `DeepSpeedEngine.step`, accelerate's `DeepSpeedEngineWrapper.backward` (which calls
`engine.step()` right after `engine.backward()`), or the HF Trainer.

Under ZeRO-3 the mask is partitioned exactly like the parameters: each parameter is flattened and split into
`ceil(numel / W)`-element slices (W = size of `param.ds_process_group`, tail zero-padded); rank r keeps only
the bits of elements [r*ceil, (r+1)*ceil), bit-packed (1 bit per element), read from the mask file row range by
row range, plus the original values of only its masked elements.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.masks.bits import pack_bits, unpack_bits
from safeneurons.masks.io import check_masks_fit
from safeneurons.masks.source import MaskElements
from safeneurons.runtime.distributed import reduce_over_ranks
from safeneurons.runtime.zero3 import (full_shape, is_partitioned, local_layout, local_weights,
                                       named_parameters_with_shapes)

if TYPE_CHECKING:
    from safeneurons.masks.source import MaskSource

log = logging.getLogger(__name__)

FROZEN_ATTRIBUTE = "safeneurons_frozen"  # where freeze_safety_critical_neurons leaves the FrozenWeights on a model


@dataclass
class MaskSlice:
    """The part of one parameter's mask this rank keeps: `length` elements of the flattened parameter (its ZeRO-3
    partition, padding included, or the whole parameter), bit-packed, and the masked elements' original values."""

    name: str
    param: nn.Parameter
    length: int
    packed: torch.Tensor
    values: torch.Tensor  # original values of the masked elements, in element order

    @property
    def count(self) -> int:
        return self.values.numel()

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.packed, self.length)

    @property
    def mask_bytes(self) -> int:
        return self.packed.numel()

    @property
    def value_bytes(self) -> int:
        return self.values.numel() * self.values.element_size()


def _build_slice(name: str, param: nn.Parameter, source: MaskElements) -> MaskSlice:
    shape = full_shape(param)
    start, length, valid = local_layout(param)
    mask = source.elements(name, shape, start, start + valid)
    if length > valid:
        mask = torch.cat([mask, torch.zeros(length - valid, dtype=torch.bool)])
    return slice_from_local_mask(name, param, mask)


def slice_from_local_mask(name: str, param: nn.Parameter, mask: torch.Tensor) -> MaskSlice:
    """The slice freezing `param`'s local elements under `mask` (this rank's `local_layout` length) at their
    current values."""
    weights = local_weights(param)
    values = weights[:mask.numel()][mask.to(weights.device)].clone()
    return MaskSlice(name, param, mask.numel(), pack_bits(mask.cpu()).to(weights.device), values)


def _class_names(target: Any) -> set[str]:
    return {cls.__name__ for cls in type(target).__mro__}


def _unwrap_optimizer(target: Any) -> Any:
    """The optimizer object whose `step` updates the weights: a DeepSpeed engine's optimizer (ZeRO-3, ZeRO 1-2,
    bf16 or plain), the inner optimizer of an accelerate wrapper, or a torch optimizer as it is."""
    names = _class_names(target)
    if "DeepSpeedEngine" in names or names & {"AcceleratedOptimizer", "DeepSpeedOptimizerWrapper"}:
        return _unwrap_optimizer(target.optimizer)
    if not callable(getattr(target, "step", None)):
        raise SafeneuronsError(f"cannot attach frozen weights to {type(target).__name__}: expected a torch "
                               f"optimizer, a DeepSpeed engine or an accelerate-wrapped optimizer")
    if "FP16_Optimizer" in names:
        raise SafeneuronsError("DeepSpeed's fused FP16_Optimizer is not supported with frozen weights; train in "
                               "float32 or bfloat16")
    return target


def _master_copies(optimizer: Any) -> dict[int, torch.Tensor]:
    """Full fp32 master copies kept beside the model's weights (DeepSpeed's FP16_UnfusedOptimizer, used for
    bf16 without ZeRO), by id of the model parameter."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not isinstance(low, list) or not isinstance(high, list):
        return {}
    return {id(lp): hp for low_group, high_group in zip(low, high) if isinstance(low_group, list)
            for lp, hp in zip(low_group, high_group)}


class FrozenWeights:
    """The frozen elements of a model and the mechanism that keeps them bit-identical (see module docstring).

    `strength` s in [0, 1] makes the freeze partial: after each step every copy of a masked element becomes
    `torch.lerp(after, before, s)` (before = its value before this step), which is exact at both ends. s = 1 is
    the bit-exact freeze (masked gradients zeroed before the step, saved originals written back after it);
    for s < 1 the masked gradients are kept, so the element trains and is pulled back s of the way; s = 0 is
    plain training (`attach` does nothing)."""

    def __init__(self, slices: Mapping[str, MaskSlice], strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 1.0:
            raise SafeneuronsError(f"freeze strength {strength} must be in [0, 1]")
        self.slices = dict(slices)
        self.strength = strength
        self.partitioned = any(is_partitioned(entry.param) for entry in self.slices.values())
        self._hooks: list[Any] = []
        self._optimizer: Any = None
        self._original_step: Callable | None = None
        self._masters: dict[int, torch.Tensor] = {}

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def local_count(self) -> int:
        return sum(entry.count for entry in self.slices.values())

    @property
    def mask_bytes(self) -> int:
        """Bytes of packed mask bits this rank holds."""
        return sum(entry.mask_bytes for entry in self.slices.values())

    @property
    def value_bytes(self) -> int:
        """Bytes of saved original values this rank holds (one per masked local element)."""
        return sum(entry.value_bytes for entry in self.slices.values())

    def frozen_count(self) -> int:
        """Frozen elements of the whole model (collective under ZeRO-3)."""
        return int(reduce_over_ranks(float(self.local_count))) if self.partitioned else self.local_count

    # --- attaching ---------------------------------------------------------------------------------------
    def attach(self, target: Any) -> "FrozenWeights":
        """Wrap the step of the optimizer that owns the weights, given a torch optimizer, a DeepSpeed engine or an
        accelerate-wrapped optimizer (the HF Trainer's, which `FrozenWeightsCallback` passes)."""
        optimizer = _unwrap_optimizer(target)
        if self._optimizer is optimizer:
            return self
        if "DeepSpeedZeroOptimizer_Stage3" in _class_names(optimizer) and not self.partitioned:
            raise SafeneuronsError("the optimizer is ZeRO-3 but freeze() saw whole, unpartitioned weights: build the "
                                   "model under zero.Init (load_model with the DeepSpeed config, or HfDeepSpeedConfig) "
                                   "or call freeze(engine.module, masks) after deepspeed.initialize")
        self.detach()
        if self.strength == 0.0:
            return self  # plain training, bit for bit
        original_step = optimizer.step

        @functools.wraps(original_step)  # keeps the marks a torch LR scheduler left on the step it wrapped
        def step(*args: Any, **kwargs: Any) -> Any:
            if self.strength < 1.0:
                before = self._masked_values()
                result = original_step(*args, **kwargs)
                self._pull_back(before)
                return result
            self.zero_frozen_grads()
            result = original_step(*args, **kwargs)
            self.restore()
            return result

        optimizer.step = step
        self._optimizer, self._original_step = optimizer, original_step
        self._masters = _master_copies(optimizer)
        if not self.partitioned and self.strength == 1.0:
            self._hooks = [entry.param.register_hook(_grad_zeroing_hook(entry))
                           for entry in self.slices.values() if entry.param.requires_grad and entry.count]
        return self

    def detach(self) -> None:
        if self._optimizer is not None:
            self._optimizer.step = self._original_step
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._optimizer, self._original_step, self._masters = [], None, None, {}

    # --- the two halves of the mechanism -----------------------------------------------------------------
    def zero_frozen_grads(self) -> None:
        """Zero the masked entries of the gradients the optimizer is about to use.

        ZeRO-3: the local fp32 gradient partition (valid between backward and step). Elsewhere the gradient
        hooks already did it as each gradient was produced (before clipping and before any reduction), so this
        only cleans up `.grad` of parameters that a caller filled by hand."""
        if self.partitioned:
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            for entry in self._active():
                grad = safe_get_local_grad(entry.param)  # the partition itself, or a copy when offloaded
                if grad is not None:
                    safe_set_local_grad(entry.param, grad.masked_fill_(entry.mask().to(grad.device), 0))
            return
        for entry in self._active():
            if entry.param.grad is not None:
                entry.param.grad.view(-1).masked_fill_(entry.mask().to(entry.param.grad.device), 0)

    def restore(self) -> None:
        """Write the saved values of the masked elements back into every copy of the weights."""
        if self.partitioned:
            self._restore_zero3()
        else:
            self._restore_full()

    def _active(self) -> Iterable[MaskSlice]:
        return (entry for entry in self.slices.values() if entry.count and entry.param.requires_grad)

    def _restore_zero3(self) -> None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        for entry in self._active():
            mask = entry.mask()
            local = entry.param.ds_tensor.data.view(-1)
            original = entry.values.to(local.dtype)
            local.masked_scatter_(mask.to(local.device), original)
            master = safe_get_local_fp32_param(entry.param)  # the partition itself, or a copy when offloaded
            if master is not None:
                master.data.masked_scatter_(mask.to(master.device), original.to(master.device, master.dtype))
                safe_set_local_fp32_param(entry.param, master)
        self._regather_persistent()

    def _regather_persistent(self) -> None:
        """ZeRO-3 keeps small parameters gathered between steps and gathers them inside the step, before our
        restore: gather the masked ones again so the next forward sees the restored values (collective; every
        rank has the same list because it depends on names only)."""
        persistent = [entry.param for entry in self.slices.values()
                      if getattr(entry.param, "ds_persist", False) and entry.param.requires_grad]
        if persistent:
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)

    def _restore_full(self) -> None:
        for entry in self._active():
            original = entry.values.to(local_weights(entry.param).dtype)
            for copy, copy_mask, first in self._copies(entry, entry.mask()):
                copy_mask = copy_mask.to(copy.device)
                values = original[first:first + int(copy_mask.sum())]
                copy.data.view(-1).masked_scatter_(copy_mask, values.to(copy.device, copy.dtype))

    # --- partial freezing ----------------------------------------------------------------------------------
    def _step_copies(self, entry: MaskSlice, mask: torch.Tensor
                     ) -> list[tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], None] | None]]:
        """Every copy of the entry's local weights the optimizer updates: (flat tensor, its mask, write-back or
        None when the tensor is the storage itself; ZeRO-3's fp32 master may be an offloaded copy)."""
        if not self.partitioned:
            return [(copy.data.view(-1), copy_mask.to(copy.device), None)
                    for copy, copy_mask, _ in self._copies(entry, mask)]
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = entry.param.ds_tensor.data.view(-1)[:entry.length]
        copies: list = [(local, mask.to(local.device), None)]
        master = safe_get_local_fp32_param(entry.param)
        if master is not None:
            copies.append((master.data.view(-1), mask.to(master.device),
                           lambda value, param=entry.param: safe_set_local_fp32_param(param, value)))
        return copies

    def _masked_values(self) -> list[list[torch.Tensor]]:
        """Before a step: the masked elements of every copy, per active entry."""
        return [[copy[copy_mask].clone() for copy, copy_mask, _ in self._step_copies(entry, entry.mask())]
                for entry in self._active()]

    def _pull_back(self, before: list[list[torch.Tensor]]) -> None:
        """After a step: every masked element moves `strength` of the way back to its pre-step value."""
        for entry, entry_before in zip(list(self._active()), before):
            for (copy, copy_mask, write_back), previous in zip(self._step_copies(entry, entry.mask()), entry_before):
                copy.masked_scatter_(copy_mask, torch.lerp(copy[copy_mask], previous, self.strength))
                if write_back is not None:
                    write_back(copy)
        if self.partitioned:
            self._regather_persistent()

    # --- measurements ------------------------------------------------------------------------------------
    def max_drift(self) -> float:
        """Largest |current - original| over the frozen elements of the weights and of the optimizer's fp32
        master copies (collective under ZeRO-3); 0.0 by design."""
        local = 0.0
        for entry in (entry for entry in self.slices.values() if entry.count):  # trained or not (LoRA's base)
            mask = entry.mask()
            original = entry.values.to(local_weights(entry.param).dtype).float().cpu()
            for copy, copy_mask, first in self._copies(entry, mask):
                selected = copy.detach().reshape(-1)[copy_mask.to(copy.device)].float().cpu()
                expected = original[first:first + selected.numel()]
                if selected.numel():
                    local = max(local, float((selected - expected).abs().max()))
        return reduce_over_ranks(local, "max") if self.partitioned else local

    def _copies(self, entry: MaskSlice, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Every copy of the entry's local weights: (flat tensor, its mask, index of its first masked value)."""
        copies = [(local_weights(entry.param)[:entry.length], mask, 0)]
        if self.partitioned:
            from deepspeed.utils import safe_get_local_fp32_param

            if not hasattr(entry.param, "_z3_optimizer"):  # before the engine exists there is no master copy
                return copies
            master = safe_get_local_fp32_param(entry.param)
            if master is not None:
                copies.append((master, mask, 0))
            return copies
        if id(entry.param) in self._masters:
            copies.append((self._masters[id(entry.param)], mask, 0))
        mapping = getattr(entry.param, "_hp_mapping", None)
        if mapping is not None:
            address = mapping.lp_fragment_address
            copies.append((mapping.hp_fragment, mask[address.start:address.start + address.numel],
                           int(mask[:address.start].sum())))
        return copies

    def local_mask(self, name: str) -> torch.Tensor | None:
        """This rank's mask of parameter `name` over its local elements, or None if no mask covers it."""
        entry = self.slices.get(name)
        return None if entry is None else entry.mask()


def _grad_zeroing_hook(entry: MaskSlice) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(entry.mask().to(grad.device).view(grad.shape), 0)

    return hook


def freeze(model: nn.Module, masks: MaskSource, strength: float = 1.0) -> FrozenWeights:
    """The frozen weights of `model` given `masks` (name -> bool tensor, or a mask file/folder).

    Call it on the weights training starts from (before loading a checkpoint to resume: the saved values are
    the originals) and, under ZeRO-3, after the model is partitioned; then `attach` the result to the optimizer
    or DeepSpeed engine (`strength` < 1: a partial freeze, see FrozenWeights). Raises SafeneuronsError naming
    the first mask that fits no parameter."""
    source = MaskElements(masks)
    mask_shapes = source.shapes()
    parameters = dict(model.named_parameters())
    check_masks_fit(mask_shapes, named_parameters_with_shapes(model))
    slices = {name: _build_slice(name, parameters[name], source) for name in mask_shapes}
    frozen = FrozenWeights(slices, strength)
    log.info("frozen weights: %d local masked elements, %d bytes of mask bits and %d bytes of saved values on "
             "this rank", frozen.local_count, frozen.mask_bytes, frozen.value_bytes)
    return frozen
