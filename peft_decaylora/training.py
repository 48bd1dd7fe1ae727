"""Tie the DecayLoRA schedule to training: a Trainer callback and an optimizer hook for custom loops.

The schedule position of every adapted layer is a persistent buffer (``decaylora_step``) saved with the model, so
whatever restores the model (a Trainer checkpoint, ``accelerator.load_state``, ``PeftModel.from_pretrained``) also
restores the schedule. The two entry points here only *move* it, once per real optimizer step:

* :class:`DecayLoraCallback` for ``transformers.Trainer``: the step follows ``state.global_step``.
* :func:`attach_schedule` for plain PyTorch and Accelerate loops: a post-step hook on the torch optimizer, which runs
  only when the optimizer really steps (not on micro-batches Accelerate skips under gradient accumulation, not on
  steps a ``GradScaler`` skips).
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback

from .calibration import initialize_from_activations
from .layer import DecayLoraLayer
from .schedule import is_resolvable, schedule_bounds

LOG_KEYS = ("decay_factor", "noise_scale")

_HOOK_ATTRIBUTE = "_decaylora_schedule_hook"


# ----------------------------------------------------------------------------------------------------- helpers
def _unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / Accelerate / torch.compile wrappers (they expose the model as ``module`` or ``_orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _schedule_targets(model: Optional[nn.Module]) -> list[tuple[DecayLoraLayer, str]]:
    """``(layer, adapter)`` for every DecayLoRA layer and each of its active adapters: what a training step moves."""
    if model is None:
        raise ValueError("DecayLoRA: no model was given to drive the schedule of.")
    targets = []
    for module in model.modules():
        if isinstance(module, DecayLoraLayer):
            targets.extend((module, name) for name in module.active_adapters if name in module.decaylora_step)
    if not targets:
        raise ValueError(
            f"DecayLoRA: the model ({type(model).__name__}) has no active DecayLoRA adapter, so there is no schedule "
            "to drive. Create it with `peft.get_peft_model(model, peft_decaylora.DecayLoraConfig(...))`."
        )
    return targets


def _configs(model: nn.Module, targets) -> list:
    """The distinct config objects behind the targets (the layers' and the model's ``peft_config``, once each)."""
    adapters = {name for _, name in targets}
    found = {id(layer.decaylora_config[name]): layer.decaylora_config[name] for layer, name in targets}
    peft_config = getattr(_unwrap_model(model), "peft_config", None)
    if isinstance(peft_config, dict):
        for name, config in peft_config.items():
            if name in adapters:
                found.setdefault(id(config), config)
    return list(found.values())


def _fill_total_steps(model: nn.Module, targets, total_steps: int, override: bool) -> None:
    """Set ``total_steps`` on every config (only where it is None unless ``override``), validating it first."""
    if int(total_steps) != total_steps or total_steps <= 0:
        raise ValueError(f"`total_steps` must be a positive integer, got {total_steps!r}.")
    configs = _configs(model, targets)
    for config in configs:
        if config.total_steps is None or override:
            schedule_bounds(int(total_steps), config.decay_start, config.decay_end)
    for config in configs:
        if config.total_steps is None or override:
            config.total_steps = int(total_steps)
        elif config.total_steps != total_steps:
            warnings.warn(
                f"DecayLoRA: the adapter config sets total_steps={config.total_steps}, but the run has {total_steps} "
                "optimizer steps; the config's value is kept, so the schedule does not end with the run. Set "
                "`DecayLoraConfig(total_steps=None)` to take the run's length.",
                stacklevel=3,
            )


def _current_step(targets) -> int:
    steps = {layer.get_step(name) for layer, name in targets}
    if len(steps) != 1:
        raise RuntimeError(f"DecayLoRA layers are at different schedule steps: {sorted(steps)}.")
    return steps.pop()


def _set_step(targets, step: int) -> None:
    for layer, name in targets:
        layer.set_step(int(step), [name])


def _schedule_logs(targets) -> dict[str, float]:
    layer, name = targets[0]
    d, scale = layer.schedule_point(name)
    return {"decay_factor": d, "noise_scale": scale}


def _check_resolvable(targets, what: str) -> None:
    for layer, name in targets:
        config = layer.decaylora_config[name]
        if not is_resolvable(config.total_steps, config.decay_start, config.decay_end):
            raise ValueError(
                f"DecayLoRA adapter {name!r}: decay_start={config.decay_start} / decay_end={config.decay_end} are "
                f"fractions of `total_steps`, which is None. {what}"
            )


def _calibration_batches(train_dataloader, args, count: int) -> Iterator[Any]:
    """``count`` batches of the Trainer's training data, sampled with the run's seed from a generator of their own
    (the global RNG, and so the training order, is untouched; every process draws the same), on the run's device."""
    dataset, batch_size = train_dataloader.dataset, args.per_device_train_batch_size
    sampler = None
    if not isinstance(dataset, torch.utils.data.IterableDataset):  # an iterable dataset gives its first batches
        size = min(len(dataset), count * batch_size)
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=size,
                                                 generator=torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         collate_fn=train_dataloader.collate_fn)
    for batch in itertools.islice(loader, count):
        if isinstance(batch, Mapping):
            batch = {key: value.to(args.device) if torch.is_tensor(value) else value for key, value in batch.items()}
        yield batch


# ----------------------------------------------------------------------------------------------- custom loops
def _innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's ``AcceleratedOptimizer`` (and similar wrappers holding ``optimizer``).

    ``AcceleratedOptimizer`` does not run ``Optimizer.__init__``, so it has no hooks of its own; the hook goes on the
    optimizer it wraps, whose ``step`` it calls only for real steps (sync step, not skipped by the scaler).
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer (or wrap one), got {type(optimizer).__name__}.")
    return optimizer


def attach_schedule(model: nn.Module, optimizer, total_steps: Optional[int] = None) -> RemovableHandle:
    """Advance the DecayLoRA schedule of ``model`` once per real step of ``optimizer``.

    For plain PyTorch and Accelerate loops (the Trainer uses :class:`DecayLoraCallback`). Call it once, after
    ``accelerator.prepare`` if you use Accelerate (passing the prepared model and optimizer is fine)::

        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        peft_decaylora.attach_schedule(model, optimizer, total_steps=num_optimizer_steps)

    The hook is a ``register_step_post_hook`` on the torch optimizer (unwrapped from Accelerate's
    ``AcceleratedOptimizer``), so it runs only when the optimizer really steps: not on micro-batches that Accelerate's
    gradient accumulation skips, and not on steps a ``GradScaler`` skips for inf/NaN gradients.

    The schedule continues from the model's current step: 0 for a new adapter, the saved step after
    ``accelerator.load_state(...)`` or ``PeftModel.from_pretrained(..., is_trainable=True)``; the step is a buffer in
    the model's state dict, so ``accelerator.save_state`` / ``load_state`` restore it with the model.

    Args:
        model: The DecayLoRA model (a ``PeftModel``, possibly wrapped by DDP / Accelerate).
        optimizer: The optimizer that trains it (``torch.optim.Optimizer`` or ``AcceleratedOptimizer``).
        total_steps: Optimizer steps of the whole run. Overrides the config's value; required when the config leaves
            it None and ``decay_start`` / ``decay_end`` are fractions.

    Returns:
        A handle; ``handle.remove()`` detaches the schedule. Attaching again to the same optimizer replaces the
        previous hook, so the schedule never advances twice per step.
    """
    targets = _schedule_targets(model)
    if total_steps is not None:
        _fill_total_steps(model, targets, total_steps, override=True)
    _check_resolvable(targets, "Pass `attach_schedule(model, optimizer, total_steps=...)`.")
    _current_step(targets)  # fail now, not at the first step, if the layers disagree
    inner = _innermost_optimizer(optimizer)
    previous = getattr(inner, _HOOK_ATTRIBUTE, None)
    if previous is not None:
        previous.remove()

    def advance(_optimizer, _args, _kwargs) -> None:
        _set_step(targets, _current_step(targets) + 1)

    handle = inner.register_step_post_hook(advance)
    setattr(inner, _HOOK_ATTRIBUTE, handle)
    return handle


# ---------------------------------------------------------------------------------------------------- Trainer
class DecayLoraCallback(TrainerCallback):
    """Drive the DecayLoRA schedule from a ``transformers.Trainer``: ``Trainer(..., callbacks=[DecayLoraCallback()])``.

    * At train begin it fills the adapter's ``total_steps`` from the Trainer's ``max_steps`` when the config leaves it
      None, and sets the step to ``state.global_step`` (so a run resumed from a checkpoint continues where it
      stopped).
    * After every optimizer step (``on_step_end``, i.e. once per ``gradient_accumulation_steps`` micro-batches) it
      sets the step to ``state.global_step``.
    * It adds ``decay_factor`` and ``noise_scale`` (noise std as a multiple of the weight's) to the training logs, so
      they reach the progress bar, ``trainer.state.log_history`` and the reporting integrations (TensorBoard, W&B...)
      like ``learning_rate`` does.
    * With ``calibration_batches``, at the start of a run (not of a resumed one, whose checkpoint carries the split)
      it refines the SVD split of an ``init_weights="svd"`` adapter on that many training batches
      (:func:`initialize_from_activations`), sampled with ``args.seed`` without touching the training order.

    Args:
        log (`bool`): Add the schedule to the logs (default True).
        calibration_batches (`int`): Training batches for the activation-aware initialisation; 0 (default) skips it.
    """

    def __init__(self, log: bool = True, calibration_batches: int = 0):
        if not isinstance(calibration_batches, int) or isinstance(calibration_batches, bool) or calibration_batches < 0:
            raise ValueError(f"`calibration_batches` must be an integer >= 0, got {calibration_batches!r}.")
        self.log_schedule = log
        self.calibration_batches = calibration_batches

    # The Trainer appends user callbacks after its reporting integrations, which would then log before this callback
    # adds its values. The handler that is calling us is the frame above; moving this callback to the front of its
    # list while it iterates is safe (the loop's next index still points at the callback that followed us).
    def _run_first(self) -> None:
        frame = inspect.currentframe()
        try:
            for _ in range(4):
                frame = frame.f_back if frame is not None else None
                handler = frame.f_locals.get("self") if frame is not None else None
                callbacks = getattr(handler, "callbacks", None)
                if isinstance(callbacks, list) and any(cb is self for cb in callbacks):
                    if callbacks[0] is not self:
                        callbacks.remove(self)
                        callbacks.insert(0, self)
                    return
        finally:
            del frame

    def on_init_end(self, args, state, control, **kwargs):
        if self.log_schedule:
            self._run_first()

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.log_schedule:
            self._run_first()
        targets = _schedule_targets(model)
        if state.max_steps and state.max_steps > 0:
            _fill_total_steps(model, targets, state.max_steps, override=False)
        _check_resolvable(targets, "The Trainer did not report `max_steps`; set `DecayLoraConfig(total_steps=...)`.")
        _set_step(targets, state.global_step)
        if self.calibration_batches and state.global_step == 0:
            for adapter_name in dict.fromkeys(name for _, name in targets):
                batches = _calibration_batches(train_dataloader, args, self.calibration_batches)
                initialize_from_activations(_unwrap_model(model), batches, adapter_name=adapter_name)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        _set_step(_schedule_targets(model), state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.log_schedule or logs is None or model is None or not ("loss" in logs or "learning_rate" in logs):
            return
        values = _schedule_logs(_schedule_targets(model))
        logs.update(values)
        # Trainer.log appends a copy of `logs` (plus "step") to the history before calling on_log.
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get("step") == state.global_step and all(k in last for k in logs
                                                                                     if k not in values):
            last.update(values)
