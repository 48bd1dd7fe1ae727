"""Tie the DecayLoRA schedule to training, once per real optimizer step: :class:`DecayLoraCallback` for the Trainer,
:func:`attach_schedule` for custom loops. Both only *move* it: the step is saved with the adapter, so restoring the
model (a Trainer checkpoint, ``accelerator.load_state``, ``PeftModel.from_pretrained``) restores it too."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback

from .model import DecayLoraModel
from .schedule import schedule_bounds
from .svd import initialize_from_activations

_HOOK_ATTRIBUTE = "_decaylora_schedule_hook"


def tuner_of(model: Optional[nn.Module]) -> DecayLoraModel:
    """The DecayLoRA tuner of a ``PeftModel``, also inside DDP / Accelerate / ``torch.compile`` wrappers."""
    while isinstance(model, nn.Module) and not isinstance(model, DecayLoraModel):
        model = next((inner for attribute in ("base_model", "module", "_orig_mod")
                      if isinstance(inner := getattr(model, attribute, None), nn.Module) and inner is not model), None)
    if model is None or not model.active_adapters:
        raise ValueError("DecayLoRA: the model has no active DecayLoRA adapter, so there is no schedule to drive. "
                         "Create it with `peft.get_peft_model(model, peft_decaylora.DecayLoraConfig(...))`.")
    return model


def _take_run_length(tuner: DecayLoraModel, total_steps: Optional[int], override: bool, missing: str) -> None:
    """Set the run length (unless the config has one and no ``override``); if still unknown, raise with ``missing``."""
    name = tuner.resolve_adapter()
    config = tuner.schedules[name].config
    if total_steps is not None and (config.total_steps is None or override):
        tuner.set_total_steps(total_steps)
    elif total_steps is not None and config.total_steps != total_steps:
        warnings.warn(f"DecayLoRA: the adapter config sets total_steps={config.total_steps}, but the run has "
                      f"{total_steps} optimizer steps; the config's value is kept, so the schedule does not end with "
                      "the run. Set `DecayLoraConfig(total_steps=None)` to take the run's length.", stacklevel=3)
    if not tuner.schedules[name].resolvable:
        raise ValueError(f"DecayLoRA adapter {name!r}: decay_start={config.decay_start} / decay_end="
                         f"{config.decay_end} are fractions of `total_steps`, which is None. {missing}")


def _calibration_batches(train_dataloader, args, count: int) -> Iterator[Any]:
    """``count`` batches of the Trainer's training data, sampled with the run's seed from a generator of their own
    (the global RNG, and so the training order, is untouched; every process draws the same), on the run's device."""
    dataset, batch_size = train_dataloader.dataset, args.per_device_train_batch_size
    sampler = None
    if not isinstance(dataset, torch.utils.data.IterableDataset):  # an iterable dataset gives its first batches
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=min(len(dataset), count * batch_size),
                                                 generator=torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         collate_fn=train_dataloader.collate_fn)
    for batch in itertools.islice(loader, count):
        if isinstance(batch, Mapping):
            batch = {key: value.to(args.device) if torch.is_tensor(value) else value for key, value in batch.items()}
        yield batch


def attach_schedule(model: nn.Module, optimizer, total_steps: Optional[int] = None) -> RemovableHandle:
    """Advance the DecayLoRA schedule of ``model`` once per real step of ``optimizer``, for plain PyTorch and
    Accelerate loops (the Trainer uses :class:`DecayLoraCallback`); call it after ``accelerator.prepare``.

    The hook is a ``register_step_post_hook`` on the torch optimizer (unwrapped from Accelerate's
    ``AcceleratedOptimizer``), which runs only for real steps: not for micro-batches that gradient accumulation skips,
    nor for steps a ``GradScaler`` skips. The schedule continues from the model's step: 0 for a new adapter, the saved
    one after ``accelerator.load_state`` or ``PeftModel.from_pretrained(..., is_trainable=True)``.

    Args:
        model: The DecayLoRA model (a ``PeftModel``, possibly wrapped by DDP / Accelerate).
        optimizer: The optimizer that trains it (``torch.optim.Optimizer`` or ``AcceleratedOptimizer``).
        total_steps: Optimizer steps of the whole run; overrides the config's, and is needed when that is None.

    Returns:
        A handle: ``handle.remove()`` detaches the schedule. Attaching again replaces the previous hook.
    """
    tuner = tuner_of(model)
    _take_run_length(tuner, total_steps, override=True,
                     missing="Pass `attach_schedule(model, optimizer, total_steps=...)`.")
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # AcceleratedOptimizer
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}.")
    if (previous := getattr(optimizer, _HOOK_ATTRIBUTE, None)) is not None:
        previous.remove()
    handle = optimizer.register_step_post_hook(lambda *_: tuner.set_step(tuner.schedule_state()["step"] + 1))
    setattr(optimizer, _HOOK_ATTRIBUTE, handle)
    return handle


class DecayLoraCallback(TrainerCallback):
    """Drive the DecayLoRA schedule from a ``transformers.Trainer``: ``Trainer(..., callbacks=[DecayLoraCallback()])``.

    At train begin it gives the adapter the Trainer's ``max_steps`` when the config's ``total_steps`` is None, and
    sets the step to ``state.global_step`` (a resumed run continues where it stopped); after every optimizer step it
    sets it again. It adds ``decay_factor`` and ``noise_scale`` to the logs (reporting integrations see them only if
    it runs before them: ``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(DecayLoraCallback))``).

    Args:
        log (`bool`): Add the schedule to the logs (default True).
        calibration_batches (`int`): Before a new run (a resumed one's checkpoint carries the split), fit the SVD start
            of an ``init_weights="svd"`` adapter to this many training batches (:func:`initialize_from_activations`),
            sampled with ``args.seed`` without touching the training order. 0 (default): no fit.
    """

    def __init__(self, log: bool = True, calibration_batches: int = 0):
        if not isinstance(calibration_batches, int) or isinstance(calibration_batches, bool) or calibration_batches < 0:
            raise ValueError(f"`calibration_batches` must be an integer >= 0, got {calibration_batches!r}.")
        self.log_schedule, self.calibration_batches = log, calibration_batches

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        tuner = tuner_of(model)
        _take_run_length(tuner, state.max_steps if state.max_steps and state.max_steps > 0 else None, override=False,
                         missing="The Trainer did not report `max_steps`; set `DecayLoraConfig(total_steps=...)`.")
        tuner.set_step(state.global_step)
        if self.calibration_batches and state.global_step == 0:
            batches = _calibration_batches(train_dataloader, args, self.calibration_batches)
            initialize_from_activations(tuner, batches, adapter_name=tuner.resolve_adapter())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        tuner_of(model).set_step(state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.log_schedule or logs is None or model is None or not ("loss" in logs or "learning_rate" in logs):
            return
        schedule = tuner_of(model).schedule_state()
        values = {"decay_factor": schedule["decay_factor"], "noise_scale": schedule["noise_scale"]}
        logs.update(values)
        # Trainer.log appends a copy of `logs` (plus "step") to the history before calling on_log
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get("step") == state.global_step and all(
                key in last for key in logs if key not in values):
            last.update(values)
