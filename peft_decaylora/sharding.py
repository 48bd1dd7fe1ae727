"""Sharded parameters. FSDP2 (``fully_shard``) keeps every parameter as a DTensor shard outside its module's forward:
the two steps that need a whole weight outside a forward, the SVD split and the noise statistics, gather one layer's
at a time and write back each rank's shard only; merging and compressing a sharded model raise instead. DeepSpeed
ZeRO-3 leaves a partitioned parameter empty outside its forward: those steps raise (docs/sharded_training.md)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter whose data is elsewhere (empty outside its forward)."""
    return hasattr(tensor, "ds_id") and tensor.numel() != getattr(tensor, "ds_numel", tensor.numel())


def check_not_partitioned(tensor: torch.Tensor) -> None:
    """Raise for a ZeRO-3 parameter outside its forward, whose whole value no step here can write back."""
    if is_partitioned(tensor):
        raise RuntimeError(f"DecayLoRA needs a whole weight (shape {tuple(tensor.ds_shape)}) that DeepSpeed ZeRO-3 has "
                           "partitioned: fit the SVD split (`initialize_from_activations`, `DecayLoraCallback("
                           "calibration_batches=...)`) and the noise statistics before `deepspeed.initialize` or "
                           "`accelerator.prepare`. The model was not changed.")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank if it is a DTensor shard, else itself."""
    check_not_partitioned(tensor)
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def write_whole(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """``parameter.copy_(value)`` with ``value`` whole and the same on every rank: a shard keeps only its part."""
    if isinstance(parameter, DTensor):  # no communication: every rank slices its own copy of ``value``
        value = distribute_tensor(value.to(parameter.dtype), parameter.device_mesh, parameter.placements,
                                  src_data_rank=None)
    parameter.copy_(value)


def require_whole(layer: nn.Module, layer_key: str, operation: str) -> None:
    """Raise if ``layer``'s parameters are FSDP2 shards or ZeRO-3 partitions, for operations that write whole weights."""
    if any(isinstance(parameter, DTensor) or is_partitioned(parameter) for parameter in layer.parameters()):
        raise RuntimeError(
            f"{layer_key or type(layer).__name__}: {operation} needs whole weights, but the model is sharded (FSDP2 "
            "`fully_shard` or DeepSpeed ZeRO-3). Gather its state first (FSDP2: `torch.distributed.checkpoint."
            "state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))`; ZeRO-3: "
            f"`deepspeed.zero.GatheredParameters`), load it into an unsharded copy of the PEFT model and call "
            f"{operation} there. The model was not changed.")
