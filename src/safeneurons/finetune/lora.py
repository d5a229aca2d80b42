"""LoRA (through PEFT) with the safety-critical weights protected.

A LoRA update B·A touches every element of W, so protection is defined on the adapter's contribution: at masked
elements it is held at zero while training, the effective weight being

    W_eff = W + scale · (B A) ⊙ (1 − M)

(a PEFT LoRA variant computes exactly that product in the forward pass, so gradients never see the masked
elements). The model that trains is the model that is saved: `merge_adapters` writes W + scale·(B A)⊙(1 − M)
into the base weights, taking masked elements from W itself, so they are bit-identical to the original. The
cost is one dense out × in product per adapted matrix and forward (kept for the backward), instead of LoRA's
rank-r path; each rank keeps the whole mask of the adapted matrices, bit-packed, because every forward needs
all of it. Without masks this is PEFT's plain LoRA, merged the same way.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear, LoraVariant
from torch import nn

from safeneurons.errors import SafeneuronsError
from safeneurons.masks.bits import pack_bits, unpack_bits
from safeneurons.masks.source import MaskElements
from safeneurons.runtime.zero3 import is_partitioned

if TYPE_CHECKING:
    from safeneurons.masks.source import MaskSource

log = logging.getLogger(__name__)

ADAPTER = "default"


class ProtectedLora(LoraVariant):
    """The PEFT LoRA variant whose delta is zero on masked elements: `module.safeneurons_protected` holds the
    packed mask of the module's base weight."""

    @staticmethod
    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
        pass

    @staticmethod
    def masked_delta(module: Any, adapter: str) -> torch.Tensor:
        delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight * module.scaling[adapter]
        packed, shape = module.safeneurons_protected
        return delta.masked_fill(unpack_bits(packed, delta.numel()).view(shape).to(delta.device), 0.0)

    @staticmethod
    def forward(module: Any, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        dropout = module.lora_dropout[active_adapter]
        delta = ProtectedLora.masked_delta(module, active_adapter)
        return result + F.linear(dropout(x), delta).to(result.dtype)

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise SafeneuronsError("merge protected adapters with safeneurons.lora.merge_adapters")

    merge_unsafe = unmerge = merge_safe


def add_adapters(model: nn.Module, r: int, alpha: float, targets: tuple[str, ...], masks: MaskSource | None) -> nn.Module:
    """The PEFT model with LoRA on `targets` (module-name suffixes, as PEFT matches them); with masks, each adapted
    matrix's adapter is protected by its mask. Raises SafeneuronsError when no module matches."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, targets)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  lora_dropout=0.0, bias="none"))
    if masks is None:
        return peft_model
    source = MaskElements(masks)
    shapes = source.shapes()
    base_prefix = "base_model.model."
    protected = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        weight_name = name[len(base_prefix):] + ".weight"
        if weight_name not in shapes:
            continue
        shape = shapes[weight_name]
        mask = source.elements(weight_name, shape, 0, int(torch.Size(shape).numel()))
        module.safeneurons_protected = (pack_bits(mask), shape)
        module.lora_variant[ADAPTER] = ProtectedLora()
        _register_adapter_parameters(module)
        protected += 1
    log.info("LoRA r=%d on %s: %d adapted matrices protected by their masks", r, ",".join(targets), protected)
    return peft_model


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Every LoRA target must name at least one Linear of the model (by the last parts of its name)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    missing = [target for target in targets if not any(name == target or name.endswith("." + target) for name in names)]
    if missing:
        examples = sorted({name.rsplit(".", 1)[-1] for name in names})
        experts = any(name.endswith(".experts") for name, _ in model.named_modules())
        raise SafeneuronsError(f"--lora-targets {','.join(missing)} match no Linear module of the model; it has "
                               f"{', '.join(examples)}" + ("; the routed experts' fused 3-D matrices are not Linears "
                                                          "and are not adapted (freeze them, without LoRA)"
                                                          if experts else ""))


def _register_adapter_parameters(module: nn.Module) -> None:
    """Under ZeRO-3 a module's forward gathers only its own parameters: the protected forward reads A and B
    directly, so they are registered with the module (a no-op without DeepSpeed)."""
    try:
        from deepspeed.zero import register_external_parameter
    except ImportError:
        return
    for adapters in (module.lora_A, module.lora_B):
        register_external_parameter(module, adapters[ADAPTER].weight)


def merge_adapters(peft_model: nn.Module) -> nn.Module:
    """Collective: write every adapter into its base weight (masked elements taken from the base weight itself,
    so they stay bit-identical) and return the base model without adapters. Under ZeRO-3 each matrix is gathered,
    merged on rank 0 and partitioned again."""
    import deepspeed

    from safeneurons.runtime import distributed

    for module in [module for module in peft_model.modules() if isinstance(module, LoraLinear)]:
        weight = module.get_base_layer().weight
        parameters = [weight, module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight]
        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0):
            if distributed.is_main() or not is_partitioned(weight):
                with torch.no_grad():
                    weight.data.copy_(_merged(module, weight.data))
    return peft_model.unload()


def _merged(module: Any, weight: torch.Tensor) -> torch.Tensor:
    if ADAPTER in module.lora_variant:
        delta = ProtectedLora.masked_delta(module, ADAPTER).float()
        packed, shape = module.safeneurons_protected
        masked = unpack_bits(packed, weight.numel()).view(shape).to(weight.device)
        return torch.where(masked, weight, (weight.float() + delta).to(weight.dtype))
    delta = module.lora_B[ADAPTER].weight.float() @ module.lora_A[ADAPTER].weight.float() * module.scaling[ADAPTER]
    return (weight.float() + delta).to(weight.dtype)
