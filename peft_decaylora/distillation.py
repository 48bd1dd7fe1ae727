"""Self-distillation (docs/method.md, "Distillation"): in training, the loss the model returns gains the distance
between hidden states (or output distributions) of the adapted network and of the pretrained one, which is the same
model with its DecayLoRA layers bypassed, run without gradients. It holds what the fading ``W`` carried."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .layer import single_active_adapter

CAUSAL_LMS = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())  # "auto" runs no teacher for these


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM, for which the "auto" settings differ."""
    return type(model).__name__ in CAUSAL_LMS

NEEDS = ("DecayLoRA distillation={mode!r} adds to the loss the model returns, so the model must be a transformers "
         "model that returns `loss` and `{output}`, called with `labels` (TRL's trainers compute the loss themselves, "
         "or fuse the LM head and return no logits); use distillation='auto' or 'off' otherwise.")


class Distillation:
    """The distillation of one tuner, run from forward hooks on its model, so whichever ``PeftModel`` class calls it."""

    def __init__(self, tuner) -> None:
        self.tuner = tuner
        self.teaching = False  # while the teacher runs
        self.pending = None  # (mode, weight, whether the caller asked for hidden states) of the forward in flight
        self.handles = (tuner.model.register_forward_pre_hook(self.request_hidden_states, with_kwargs=True),
                        tuner.model.register_forward_hook(self.add_loss, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def mode_and_weight(self, module: nn.Module, kwargs: dict) -> tuple[str, float]:
        """What this forward distils ("hidden_states" or "logits") and the term's weight: 0 unless training with
        distillation on."""
        name = single_active_adapter(self.tuner.active_adapters)
        config = self.tuner.peft_config.get(name)
        if not module.training or config is None or config.distillation == "off":
            return "off", 0.0
        usable = isinstance(module, PreTrainedModel) and kwargs.get("labels") is not None
        mode = config.distillation
        if mode == "auto":
            if not usable or is_causal_lm(module):
                return "off", 0.0
            mode = "hidden_states"
        if not usable or (mode == "logits" and kwargs.get("fused_lm_head")):  # TRL's fused head computes no logits
            raise ValueError(NEEDS.format(mode=mode, output=mode))
        layer = next(self.tuner.layers(name), None)
        if layer is None or layer.disable_adapters or layer.merged:
            return "off", 0.0
        fade = self.tuner.schedules[name].decay if config.distillation_schedule == "decay" else 1.0
        return mode, float(config.distillation_weight) * fade

    def request_hidden_states(self, module, args, kwargs):
        if self.teaching:
            return None
        mode, weight = self.mode_and_weight(module, kwargs)
        self.pending = (mode, weight, kwargs.get("output_hidden_states")) if weight else None
        return (args, {**kwargs, "output_hidden_states": True}) if weight and mode == "hidden_states" else None

    def add_loss(self, module, args, kwargs, outputs):
        if self.teaching or self.pending is None:
            return None
        (mode, weight, wants_hidden_states), self.pending = self.pending, None
        with torch.no_grad(), self.pretrained_network():
            teacher = module(*args, **kwargs)
        if getattr(outputs, "loss", None) is None or getattr(teacher, mode, None) is None:
            raise ValueError(NEEDS.format(mode=mode, output=mode))
        if mode == "logits":
            term = logit_distillation_loss(outputs.logits, teacher.logits, kwargs["labels"])
        else:
            layers = self.tuner.peft_config[single_active_adapter(self.tuner.active_adapters)].distillation_layers
            term = hidden_state_distillation_loss(outputs.hidden_states, teacher.hidden_states, layers)
        outputs.loss = outputs.loss + weight * term
        if mode == "hidden_states" and not wants_hidden_states:
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


def logit_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of the output distributions, averaged over the positions that are trained: for
    per-token logits ``(batch, length, classes)`` a causal LM's, position ``t`` predicting label ``t + 1`` (labels
    of -100 skipped); otherwise over the batch."""
    if student.dim() == 3 and labels.shape == student.shape[:2]:
        kept = labels[:, 1:] != -100
        student, teacher = student[:, :-1][kept], teacher[:, :-1][kept]
    student, teacher = student.flatten(0, -2).float(), teacher.flatten(0, -2).float()
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
