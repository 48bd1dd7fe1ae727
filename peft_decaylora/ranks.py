"""The rank of each adapted layer: ``r``, or the rank that keeps ``keep_fraction`` of the layer's parameters, moved
along the layer stack by ``rank_by_depth``, then ``rank_pattern`` / ``alpha_pattern``."""

from __future__ import annotations

import math
from typing import Optional

from peft.utils.other import get_pattern_key
from torch import nn


def layer_index(key: str, layers_pattern=None) -> Optional[int]:
    """Index in the layer stack of the module named ``key``, as ``layers_to_transform`` counts it: the first number
    in the name that is not its last part (the one after a name in ``layers_pattern`` if given); None outside it."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    parts = key.split(".")
    for position in range(1, len(parts) - 1):
        if parts[position].isdigit() and (not patterns or parts[position - 1] in patterns):
            return int(parts[position])
    return None


def stack_depth(model: nn.Module, layers_pattern=None) -> int:
    """Number of layers of ``model``'s layer stack: one more than the largest layer index of its modules."""
    indices = [layer_index(key, layers_pattern) for key, _ in model.named_modules()]
    return 1 + max((index for index in indices if index is not None), default=0)


def rank_keeping(fraction: float, inputs: int, outputs: list[int]) -> int:
    """Rank with ``r (inputs + out) = fraction inputs out`` summed over ``outputs`` (fused slices share it), >= 1."""
    return max(1, round(fraction * inputs * sum(outputs) / sum(inputs + out for out in outputs)))


def adapter_rank(config, key: str, inputs: int, outputs: list[int], depth: Optional[int]) -> tuple[int, float]:
    """``(r, lora_alpha)`` of the module named ``key``, whose ``inputs`` feed ``outputs`` (one per adapted slice).
    ``keep_fraction`` and ``rank_by_depth`` scale ``lora_alpha`` with the rank, so that ``s = lora_alpha / r`` stays
    the config's; ``rank_pattern`` and ``alpha_pattern`` set them as in ``LoraConfig``."""
    r = config.r if config.keep_fraction is None else rank_keeping(config.keep_fraction, inputs, outputs)
    index = layer_index(key, config.layers_pattern)
    if config.rank_by_depth and index is not None and depth >= 2:
        r = max(1, round(r * (1 + config.rank_by_depth * (2 * index / (depth - 1) - 1))))
    lora_alpha = config.lora_alpha * r / config.r
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), r)
    return r, config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), lora_alpha)


def inputs_per_output(base: nn.Module, in_features: int) -> int:
    """What one output of the layer reads: ``in_features``, times the kernel's size for a convolution."""
    return in_features * math.prod(getattr(base, "kernel_size", (1,)))
