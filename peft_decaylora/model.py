"""The DecayLoRA tuner: injects ``DecayLoraModule`` layers into a model and owns each adapter's schedule."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn
from transformers import PreTrainedModel

from . import compression
from .config import DecayLoraConfig
from .distillation import Distillation, is_causal_lm
from .fused import FusedLayout, detect_fused_layouts
from .layer import SUPPORTED_LAYERS, DecayLoraLayer, DecayLoraModule, layer_kind, single_active_adapter
from .ranks import adapter_rank, inputs_per_output, stack_depth
from .schedule import AdapterSchedule, auto_decay_end, schedule_bounds

# Training forwards at one step that show nothing drives the schedule (far above gradient accumulation, below a run).
STALLED_SCHEDULE_FORWARDS = 256


class DecayLoraModel(BaseTuner):
    """
    Creates a DecayLoRA model from a pretrained model: LoRA whose frozen weight decays to zero during fine-tuning,
    leaving a rank-``r`` layer. Use it through `peft.get_peft_model(model, DecayLoraConfig(...))`. It owns one schedule
    per adapter: `set_step` moves it (`DecayLoraCallback` and `attach_schedule` do so once per optimizer step),
    `schedule_state` reads it, and every layer of the adapter reads the same ``(d, noise scale)``.

    Args:
        model ([`torch.nn.Module`]): The model to adapt.
        config ([`DecayLoraConfig`]): The configuration of the adapter.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.
        low_cpu_mem_usage (`bool`): Create empty adapter weights on the meta device (for loading).
    """

    prefix: str = "decaylora_"
    tuner_layer_cls = DecayLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, peft_config, adapter_name, **kwargs) -> None:
        self.schedules: dict[str, AdapterSchedule] = {}
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self._forwards_at_step = (None, 0)  # (step, training forwards seen at it), to warn when nothing moves it
        self._schedule_check = self.model.register_forward_pre_hook(self._check_schedule)
        self.distillation = Distillation(self)

    def _prepare_adapter_config(self, config: DecayLoraConfig, model_config: dict) -> DecayLoraConfig:
        config = super()._prepare_adapter_config(config, model_config)
        if config.decay_end == "auto":
            decay_end = auto_decay_end(is_causal_lm(self.model), isinstance(self.model, PreTrainedModel))
            try:  # the model stays unchanged if the filled-in schedule is invalid
                dataclasses.replace(config, decay_end=decay_end)
            except ValueError as error:
                raise ValueError(f"{error} `decay_end='auto'` is {decay_end} for this model; set `decay_end` to "
                                 "a step after `decay_start`.") from None
            config.decay_end = decay_end
        if config.detect_fused_layouts:
            config.fused_layouts = {**detect_fused_layouts(model_config), **(config.fused_layouts or {})}
        return config

    def _prepare_model(self, config: DecayLoraConfig, model: nn.Module) -> None:
        """Check every targeted module before any is replaced, so that a bad target leaves the model unchanged."""
        matched, unsupported = [], {}  # reason: modules
        for key, module in model.named_modules():
            if self._check_target_module_exists(config, key):
                matched.append(key)
                if not isinstance(module, BaseTunerLayer) and (reason := _unsupported_because(module)) is not None:
                    unsupported.setdefault(reason, []).append(key)
        if unsupported:
            raise TypeError("DecayLoRA cannot adapt these target modules: " + "; ".join(
                f"{', '.join(keys)} ({reason})" for reason, keys in unsupported.items()) + ". The model was not "
                "changed. Narrow `target_modules` or add the modules to `exclude_modules`.")
        if not matched and config.target_modules is not None and not isinstance(config.target_modules, str):
            names = sorted({key.rsplit(".", 1)[-1] for key, module in model.named_modules()
                            if _unsupported_because(module) is None})
            raise ValueError(f"Target modules {sorted(config.target_modules)} match no module of the model. Modules "
                             f"DecayLoRA can adapt ({SUPPORTED_LAYERS}) are named: {names}.")
        self._stack_depth = stack_depth(model, config.layers_pattern)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if adapter_name not in self.schedules or self.schedules[adapter_name].config is not config:
            self.schedules[adapter_name] = AdapterSchedule(config)
        fused_layout = config.fused_layouts.get(get_pattern_key(config.fused_layouts.keys(), current_key))
        fused_enable = config.fused_enable.get(get_pattern_key(config.fused_enable.keys(), current_key))
        if fused_enable is not None and fused_layout is None:
            raise ValueError(f"`fused_enable` names {current_key!r}, but no fused layout is known for it; add it to "
                             "`fused_layouts`.")
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        inputs, outputs = _get_in_out_features(base)
        layout = None if fused_layout is None else FusedLayout(fused_layout, outputs, fused_enable, current_key)
        r, lora_alpha = adapter_rank(config, current_key, inputs_per_output(base, inputs),
                                     [outputs] if layout is None else layout.slice_sizes, self._stack_depth)
        layer_kwargs = dict(config=config, r=r, lora_alpha=lora_alpha, schedule=self.schedules[adapter_name],
                            fused_layout=layout)
        if isinstance(target, DecayLoraLayer):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        new_module = DecayLoraModule(target, adapter_name, layer_key=current_key, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an additional adapter is not trainable until it is activated
        self._replace_module(parent, target_name, new_module, target)

    def layers(self, adapter_name: Optional[str] = None) -> Iterator[DecayLoraLayer]:
        """The DecayLoRA layers of the model (those carrying ``adapter_name``, if given)."""
        return (module for module in self.model.modules() if isinstance(module, DecayLoraLayer)
                and (adapter_name is None or adapter_name in module.decaylora_A))

    def resolve_adapter(self, adapter_name: Optional[str] = None) -> str:
        """``adapter_name``, or the active adapter when None; an unknown name raises, naming the adapters."""
        if adapter_name is None:
            adapter_name = single_active_adapter(self.active_adapters)
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}.")
        return adapter_name

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        single_active_adapter([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.schedules.pop(adapter_name, None)

    def set_step(self, step: int, adapter_name: Optional[str] = None) -> None:
        """Move the schedule of the adapter (the active one by default) to optimizer step ``step``."""
        if int(step) != step or step < 0:
            raise ValueError(f"`step` must be a non-negative integer, got {step!r}.")
        adapter_name = self.resolve_adapter(adapter_name)
        self.schedules[adapter_name].move_to(int(step))
        for layer in self.layers(adapter_name):
            layer.decaylora_step[adapter_name].fill_(int(step))  # saved with the adapter

    def set_total_steps(self, total_steps: int, adapter_name: Optional[str] = None) -> None:
        """Fix the schedule length (optimizer steps of the whole run) that fractional decay points refer to."""
        schedule = self.schedules[self.resolve_adapter(adapter_name)]
        if int(total_steps) != total_steps or total_steps <= 0:
            raise ValueError(f"`total_steps` must be a positive integer, got {total_steps!r}.")
        schedule_bounds(int(total_steps), schedule.config.decay_start, schedule.config.decay_end)
        schedule.config.total_steps = int(total_steps)
        schedule.move_to(schedule.step)

    def schedule_state(self, adapter_name: Optional[str] = None) -> dict:
        """``{"step", "decay_factor", "noise_active", "noise_scale"}`` of the adapter (the active one by default);
        ``noise_scale`` is the noise std as a multiple of the weight's, ``sqrt(1 - d^2)`` while noise is drawn."""
        return self.schedules[self.resolve_adapter(adapter_name)].state()

    def _check_schedule(self, module, args) -> None:
        """Before a training forward: raise if the schedule has no length; warn once if nothing moves it."""
        name = single_active_adapter(self.active_adapters)
        if self.distillation.teaching or not module.training or name not in self.schedules:
            return
        schedule = self.schedules[name]
        if not schedule.resolvable:
            raise RuntimeError(f"DecayLoRA adapter {name!r} is training without a schedule length: `total_steps` is "
                               f"None and decay_start={schedule.config.decay_start} / decay_end="
                               f"{schedule.config.decay_end} are fractions of it, so the frozen weight would never "
                               "decay. Add `peft_decaylora.DecayLoraCallback()` to the Trainer's callbacks, call "
                               "`peft_decaylora.attach_schedule(model, optimizer, total_steps=...)` in a custom loop, "
                               "or set `DecayLoraConfig(total_steps=...)`.")
        if schedule.config.noise != "off" and any(hasattr(layer.get_base_layer().weight, "ds_id")
                                                  for layer in itertools.islice(self.layers(name), 1)):
            raise RuntimeError(f"DecayLoRA adapter {name!r} has noise={schedule.config.noise!r}, which does not work "
                               "under DeepSpeed ZeRO-3: the noisy product (d W + N) x reads each frozen weight outside "
                               "its base layer's forward, where ZeRO-3 does not gather it, and again in backward. "
                               "Train with noise='off' (the default) under ZeRO-3, or shard with FSDP2, which "
                               "supports noise.")
        if not torch.is_grad_enabled():
            return
        last_step, seen = self._forwards_at_step
        seen = seen + 1 if schedule.step == last_step else 1
        self._forwards_at_step = (schedule.step, seen)
        if seen == STALLED_SCHEDULE_FORWARDS:
            warnings.warn(f"DecayLoRA adapter {name!r}: {seen} training forwards ran at schedule step {schedule.step} "
                          "and nothing moved it, so the frozen weight is not decaying. Pass "
                          "`callbacks=[peft_decaylora.DecayLoraCallback()]` to the Trainer, call "
                          "`peft_decaylora.attach_schedule(model, optimizer)` in a custom loop, or move it yourself "
                          "with `model.base_model.set_step(step)`.", stacklevel=2)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge the adapter into every adapted layer, all or nothing: if one layer refuses (``safe_merge`` found
        NaN/inf), the layers merged before it are unmerged again and the error is raised."""
        self._check_merge_allowed()
        merged_now = []
        try:
            for layer in self.layers():
                was_merged = layer.merged
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                if layer.merged and not was_merged:
                    merged_now.append(layer)
        except Exception:
            for layer in merged_now:
                layer.unmerge()
            raise

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:  # all layers first, atomically, then swap them for their base layers
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        self._schedule_check.remove()
        self.distillation.remove()
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if hasattr(new_module, "base_layer") or hasattr(child, "weight"):
            super()._replace_module(parent, child_name, new_module, child)
        else:  # unloading a module_to_save without a weight (BERT's pooler): PEFT would copy the missing weight over
            setattr(parent, child_name, new_module)

    def compress_and_unload(self, adapter_name: Optional[str] = None, progressbar: bool = False) -> nn.Module:
        """`peft_decaylora.compress_and_unload` of this model: each adapted layer becomes its rank-``r`` factors."""
        return compression.compress_and_unload(self, adapter_name=adapter_name, progressbar=progressbar)


def _unsupported_because(module: nn.Module) -> Optional[str]:
    """Why DecayLoRA cannot adapt ``module`` (the error of ``layer_kind``), or None when it can."""
    try:
        layer_kind(module)
    except TypeError as error:
        return str(error)
    return None
