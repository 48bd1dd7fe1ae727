"""Self-distillation (docs/method.md, "Distillation"): in training, the loss the model returns gains the distance
between hidden states of the adapted network and of the pretrained one, which is the same model with its DecayLoRA
layers bypassed, run without gradients. It holds the representations that the fading ``W`` carried."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .layer import single_active_adapter

CAUSAL_LMS = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())  # "auto" runs no teacher for these
NEEDS = ("DecayLoRA distillation='hidden_states' adds to the loss the model returns, so the model must be a "
         "transformers model that returns `loss` and `hidden_states`, called with `labels` (TRL's trainers compute the "
         "loss themselves and get none); use distillation='auto' or 'off' otherwise.")


class Distillation:
    """The distillation of one tuner, run from forward hooks on its model, so whichever ``PeftModel`` class calls it."""

    def __init__(self, tuner) -> None:
        self.tuner = tuner
        self.teaching = False  # while the teacher runs
        self.pending = None  # (weight, whether the caller asked for hidden states) of the forward in flight
        self.handles = (tuner.model.register_forward_pre_hook(self.request_hidden_states, with_kwargs=True),
                        tuner.model.register_forward_hook(self.add_loss, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def weight(self, module: nn.Module, kwargs: dict) -> float:
        """The weight of the distillation term for this forward: 0 unless training with distillation on."""
        name = single_active_adapter(self.tuner.active_adapters)
        config = self.tuner.peft_config.get(name)
        if not module.training or config is None or config.distillation == "off":
            return 0.0
        usable = isinstance(module, PreTrainedModel) and kwargs.get("labels") is not None
        if config.distillation == "auto" and (not usable or type(module).__name__ in CAUSAL_LMS):
            return 0.0
        if not usable:
            raise ValueError(NEEDS)
        layer = next(self.tuner.layers(name), None)
        if layer is None or layer.disable_adapters or layer.merged:
            return 0.0
        fade = self.tuner.schedules[name].decay if config.distillation_schedule == "decay" else 1.0
        return float(config.distillation_weight) * fade

    def request_hidden_states(self, module, args, kwargs):
        if self.teaching:
            return None
        weight = self.weight(module, kwargs)
        self.pending = (weight, kwargs.get("output_hidden_states")) if weight else None
        return (args, {**kwargs, "output_hidden_states": True}) if weight else None

    def add_loss(self, module, args, kwargs, outputs):
        if self.teaching or self.pending is None:
            return None
        (weight, wants_hidden_states), self.pending = self.pending, None
        with torch.no_grad(), self.pretrained_network():
            teacher = module(*args, **kwargs)
        if getattr(outputs, "loss", None) is None or getattr(teacher, "hidden_states", None) is None:
            raise ValueError(NEEDS)
        layers = self.tuner.peft_config[single_active_adapter(self.tuner.active_adapters)].distillation_layers
        outputs.loss = outputs.loss + weight * hidden_state_distillation_loss(outputs.hidden_states,
                                                                               teacher.hidden_states, layers)
        if not wants_hidden_states:
            outputs.hidden_states = None
        return outputs

    @contextmanager
    def pretrained_network(self):
        """Every DecayLoRA layer computes ``W x + b`` and the model is in eval mode."""
        layers = list(self.tuner.layers())
        self.teaching = True
        for layer in layers:
            layer._disable_adapters = True
        try:
            with eval_mode(self.tuner.model):
                yield
        finally:
            self.teaching = False
            for layer in layers:
                layer._disable_adapters = False


@contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the duration, then every module back in its own mode (they may differ)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def hidden_state_distillation_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                                   layers: Optional[list[int]] = None) -> torch.Tensor:
    """Mean over ``layers`` (indices as in Python, default all; the embeddings are not a layer) of
    ``mean((h_student - h_teacher)^2) / mean(h_teacher^2)``."""
    pairs = list(zip(student[1:], teacher[1:]))
    if layers is not None:
        if not all(-len(pairs) <= i < len(pairs) for i in layers):
            raise ValueError(f"`distillation_layers` {list(layers)} names a layer the model lacks: it has "
                             f"{len(pairs)} layers (indices {-len(pairs)} to {len(pairs) - 1}).")
        pairs = [pairs[i] for i in layers]
    losses = [(s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12) for s, t in pairs]
    return torch.stack(losses).mean()
