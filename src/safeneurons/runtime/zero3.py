"""One view of ZeRO-3 parameters: whether a tensor is partitioned, its full shape and size, the
elements this rank holds, and gathering a weight or a state dict from the partitions.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from safeneurons.runtime import distributed


def is_partitioned(param: nn.Parameter) -> bool:
    """A ZeRO-3 parameter: this rank holds a partition (`ds_tensor`), not the whole tensor."""
    return hasattr(param, "ds_id")


def is_persistent(param: nn.Parameter) -> bool:
    """A ZeRO-3 parameter small enough to be kept whole on every rank beside its partition."""
    return is_partitioned(param) and param.data.numel() == param.ds_numel


def full_shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def local_layout(param: nn.Parameter) -> tuple[int, int, int]:
    """(start, length, valid): the flattened elements [start, start + valid) of `param` this rank holds, stored in
    `length` elements (the ZeRO-3 partition, tail zero-padded; or the whole parameter)."""
    if not is_partitioned(param):
        return 0, param.numel(), param.numel()
    length = param.ds_tensor.ds_numel if hasattr(param.ds_tensor, "ds_numel") else param.ds_tensor.numel()
    rank_in_group = dist.get_rank(group=param.ds_process_group)
    start = rank_in_group * length
    valid = max(0, min(length, full_numel(param) - start))
    return start, length, valid


def local_weights(param: nn.Parameter) -> torch.Tensor:
    """The weights this rank holds, flattened: the ZeRO-3 partition, or the whole parameter."""
    return (param.ds_tensor if is_partitioned(param) else param.data).reshape(-1)


def named_parameters_with_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Full (unpartitioned) shapes of the model's parameters, also under ZeRO-3."""
    return {name: full_shape(param) for name, param in model.named_parameters()}


@contextlib.contextmanager
def zero3_init_context(ds_config: dict | None) -> Iterator[None]:
    """While active, `from_pretrained` builds the model partitioned across ranks (deepspeed.zero.Init)."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = HfDeepSpeedConfig(ds_config)  # transformers checks for this object while it is alive
    try:
        yield
    finally:
        del hf_config


def is_zero3_partitioned(model: nn.Module) -> bool:
    return any(is_partitioned(param) for param in model.parameters())


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere), gathered parameter by parameter under ZeRO-3."""
    if not is_zero3_partitioned(model):
        if not distributed.is_main():
            return None
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if distributed.is_main():
                state[name] = param.data.detach().cpu().clone()
    if distributed.is_main():
        state.update({name: buffer.detach().cpu() for name, buffer in model.named_buffers()
                      if name in model.state_dict()})
    return state if distributed.is_main() else None


def weight_on_owner(param: nn.Parameter, owner: int) -> torch.Tensor | None:
    """The full weight on `owner` only: ZeRO-3 partitions are gathered there and nowhere else."""
    if not is_partitioned(param):
        return param.detach() if distributed.rank() == owner else None
    parts = distributed.gather_to_owner(param.ds_tensor.detach().reshape(-1), owner, param.ds_process_group)
    if parts is None:
        return None
    whole = parts[0] if len(parts) == 1 else torch.cat(parts)  # one partition: a view, no copy
    return whole[:full_numel(param)].view(full_shape(param))


def stored_copies(param: nn.Parameter) -> list[torch.Tensor]:
    """The tensors holding this weight's values on this rank: the whole tensor, or the ZeRO-3 partition (plus the
    full copy that a persistent, never released, parameter keeps)."""
    if not is_partitioned(param):
        return [param.data]
    return [param.ds_tensor.data] + ([param.data] if is_persistent(param) else [])
