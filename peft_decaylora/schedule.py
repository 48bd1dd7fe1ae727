"""The decay schedule (docs/method.md, "The schedule"): ``d`` and the noise scale as pure functions of the optimizer
step, and the object that holds where one adapter's run is."""

from __future__ import annotations

import math
from typing import Optional, Union

from peft.tuners._buffer_dict import BufferDict

SchedulePoint = Union[int, float]


def resolve_step(point: SchedulePoint, total_steps: Optional[int], field_name: str) -> int:
    """Turn ``decay_start`` / ``decay_end`` into a step: a float in [0, 1] is a fraction of ``total_steps``."""
    if isinstance(point, float):
        if total_steps is None:
            raise ValueError(f"`{field_name}={point}` is a fraction of `total_steps`, but `total_steps` is None. Set "
                             "`DecayLoraConfig(total_steps=...)`, call `model.base_model.set_total_steps(n)`, or train "
                             "with `peft_decaylora.DecayLoraCallback` / `peft_decaylora.attach_schedule(model, "
                             "optimizer, total_steps)`, which fill it in.")
        return int(round(point * total_steps))
    return int(point)


def schedule_bounds(total_steps: Optional[int], decay_start: SchedulePoint,
                    decay_end: SchedulePoint) -> tuple[int, int]:
    """The first step of the decay and the first step of the cool-down."""
    start = resolve_step(decay_start, total_steps, "decay_start")
    end = resolve_step(decay_end, total_steps, "decay_end")
    if start > end:
        raise ValueError(f"`decay_start` resolves to step {start}, after `decay_end` at step {end}; "
                         "`decay_start <= decay_end` is required.")
    return start, end


def auto_decay_end(causal_lm: bool, transformers_model: bool) -> float:
    """``decay_end="auto"``, as measured (docs/ablations.md): 0.3 for a causal LM (on SmolLM2 it beat 0.5 at every
    reduction, and 70% of the steps at ``d = 0`` are the cheap ones); 0.9 for other transformers models (the better
    on the mean of three text tasks with MiniLM, where "auto" also runs the distillation teacher); 0.5 for any other
    model (MobileNetV2 lost at 0.9 and at 0.3)."""
    if causal_lm:
        return 0.3
    return 0.9 if transformers_model else 0.5


def is_resolvable(total_steps: Optional[int], decay_start: SchedulePoint, decay_end: SchedulePoint) -> bool:
    """Whether the schedule's steps are known (fractions need ``total_steps``)."""
    return total_steps is not None or not (isinstance(decay_start, float) or isinstance(decay_end, float))


def decay_factor(step: int, *, total_steps: Optional[int], decay_start: SchedulePoint, decay_end: SchedulePoint,
                 min_decay: float, decay_shape: str = "linear") -> float:
    """d(t): 1 during warm-up, from 1 to ``min_decay`` between start and end (linearly, or along a half cosine with
    ``decay_shape="cosine"``), ``min_decay`` after. Before the schedule length is known, step 0 is warm-up."""
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
    return noise != "off" and d < 1.0 and (noise == "keep" or d >= noise_threshold)


def noise_scale(d: float, noise: str, noise_threshold: float) -> float:
    """The noise standard deviation as a multiple of W's, sqrt(1 - d^2), or 0 while noise is off."""
    return math.sqrt(max(0.0, 1.0 - d * d)) if noise_active(d, noise, noise_threshold) else 0.0


class AdapterSchedule:
    """Where one adapter is in its run: the optimizer step, and ``decay`` (``d``) and ``noise_scale`` there, computed
    once per move. The tuner owns one per adapter and moves it; every layer of the adapter reads the same object."""

    def __init__(self, config) -> None:
        self.config = config
        self.moves = 0  # counts every move, even to the same step: a restart at a step replays its noise
        self.move_to(0)

    @property
    def resolvable(self) -> bool:
        return is_resolvable(self.config.total_steps, self.config.decay_start, self.config.decay_end)

    def move_to(self, step: int) -> None:
        self.step, self.moves, self._point = int(step), self.moves + 1, None

    @property
    def point(self) -> tuple[float, float]:
        """``(d, noise scale)`` at the current step; the length may come after the move (a resumed run's)."""
        if self._point is None:
            config = self.config
            d = decay_factor(self.step, total_steps=config.total_steps, decay_start=config.decay_start,
                             decay_end=config.decay_end, min_decay=config.min_decay, decay_shape=config.decay_shape)
            self._point = (d, noise_scale(d, config.noise, config.noise_threshold))
        return self._point

    decay = property(lambda self: self.point[0])
    noise_scale = property(lambda self: self.point[1])

    def state(self) -> dict:
        d, scale = self.point
        return {"step": self.step, "decay_factor": d, "noise_active": scale > 0.0, "noise_scale": scale}


class StepBuffers(BufferDict):
    """The step of each adapter's schedule, saved with the adapter (per layer). However a step is loaded (in place or
    assigned by ``load_state_dict``, or set by transformers' own loader), it moves that adapter's schedule."""

    def __init__(self, schedules: dict[str, AdapterSchedule]) -> None:
        super().__init__({}, persistent=True)
        self.schedules = schedules

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        if name in self._buffers:
            self._move_schedule(name)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        for name in self._buffers:
            self._move_schedule(name)

    def _move_schedule(self, name: str) -> None:
        step, schedule = self._buffers[name], self.schedules.get(name)
        if schedule is not None and not step.is_meta and int(step) != schedule.step:
            schedule.move_to(int(step))
