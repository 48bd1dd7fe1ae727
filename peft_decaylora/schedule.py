"""The decay and noise schedule: pure functions of the optimizer step (METHOD.md, "Decay factor" and "Noise")."""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

SchedulePoint = Union[int, float]


def resolve_step(point: SchedulePoint, total_steps: Optional[int], field_name: str) -> int:
    """Turn ``decay_start`` / ``decay_end`` into a step: a float in [0, 1] is a fraction of ``total_steps``."""
    if isinstance(point, float):
        if total_steps is None:
            raise ValueError(
                f"`{field_name}={point}` is a fraction of `total_steps`, but `total_steps` is None. Set "
                "`DecayLoraConfig(total_steps=...)`, call `model.base_model.set_total_steps(n)`, or train with "
                "`peft_decaylora.DecayLoraCallback` / `peft_decaylora.attach_schedule(model, optimizer, total_steps)`, "
                "which fill it in."
            )
        return int(round(point * total_steps))
    return int(point)


def schedule_bounds(
    total_steps: Optional[int], decay_start: SchedulePoint, decay_end: SchedulePoint
) -> tuple[int, int]:
    """The first step of the linear decay and the first step of the cool-down."""
    start = resolve_step(decay_start, total_steps, "decay_start")
    end = resolve_step(decay_end, total_steps, "decay_end")
    if start > end:
        raise ValueError(
            f"`decay_start` resolves to step {start}, after `decay_end` at step {end}; `decay_start <= decay_end` "
            "is required."
        )
    return start, end


def is_resolvable(total_steps: Optional[int], decay_start: SchedulePoint, decay_end: SchedulePoint) -> bool:
    """Whether the schedule's steps are known (fractions need ``total_steps``)."""
    return total_steps is not None or not (isinstance(decay_start, float) or isinstance(decay_end, float))


def decay_factor(
    step: int,
    *,
    total_steps: Optional[int],
    decay_start: SchedulePoint,
    decay_end: SchedulePoint,
    min_decay: float,
    decay_shape: str = "linear",
) -> float:
    """d(t): 1 during warm-up, from 1 to ``min_decay`` between start and end (linearly, or along a half cosine
    with ``decay_shape="cosine"``), ``min_decay`` after.

    Before the schedule length is known, step 0 is warm-up (d = 1) so an untrained model reproduces its base model.
    """
    if step == 0 and not is_resolvable(total_steps, decay_start, decay_end):
        return 1.0
    start, end = schedule_bounds(total_steps, decay_start, decay_end)
    if step < start:
        return 1.0
    if step >= end:
        return float(min_decay)
    progress = (step - start) / (end - start)
    faded = progress if decay_shape == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))
    return 1.0 - faded * (1.0 - min_decay)


def noise_active(d: float, noise: str, noise_threshold: float) -> bool:
    """Whether noise is drawn at decay factor ``d`` ("vanish": only while d >= threshold; "keep": all d < 1)."""
    if noise == "off" or d >= 1.0:
        return False
    if noise == "keep":
        return True
    return d >= noise_threshold


def noise_scale(d: float, noise: str, noise_threshold: float) -> float:
    """The noise standard deviation as a multiple of W's, sqrt(1 - d^2), or 0 while noise is off."""
    return math.sqrt(max(0.0, 1.0 - d * d)) if noise_active(d, noise, noise_threshold) else 0.0


@functools.lru_cache(maxsize=4096, typed=True)  # typed: decay_end=1 (a step) is not decay_end=1.0 (the whole run)
def schedule_point(
    step: int,
    total_steps: Optional[int],
    decay_start: SchedulePoint,
    decay_end: SchedulePoint,
    min_decay: float,
    decay_shape: str,
    noise: str,
    noise_threshold: float,
) -> tuple[float, float]:
    """``(d, noise scale)`` at ``step``: what every adapted layer needs each forward, computed once per step."""
    d = decay_factor(step, total_steps=total_steps, decay_start=decay_start, decay_end=decay_end, min_decay=min_decay,
                     decay_shape=decay_shape)
    return d, noise_scale(d, noise, noise_threshold)
