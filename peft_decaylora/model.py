"""The DecayLoRA tuner: injects ``DecayLoraModule`` layers into a model and drives their schedule."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn
from transformers import PreTrainedModel

from .config import DecayLoraConfig
from .fused import detect_fused_layouts
from .layer import SUPPORTED_LAYERS, DecayLoraLayer, DecayLoraModule, layer_kind
from .schedule import schedule_bounds


_DISTILLATION_NEEDS = (
    "DecayLoRA distillation='hidden_states' adds to the loss the model returns, so the model must be a transformers "
    "model that returns `loss` and `hidden_states`, called with `labels`; use distillation='auto' or 'off' otherwise."
)

# Training forwards at one schedule step after which nothing is taken to drive the schedule (far above any gradient
# accumulation in use, far below a run's length).
STALLED_SCHEDULE_FORWARDS = 256


class DecayLoraModel(BaseTuner):
    """
    Creates a DecayLoRA model from a pretrained model: LoRA whose frozen weight decays to zero during fine-tuning,
    leaving a rank-``r`` layer. Use it through `peft.get_peft_model(model, DecayLoraConfig(...))`.

    Args:
        model ([`torch.nn.Module`]): The model to adapt.
        config ([`DecayLoraConfig`]): The configuration of the adapter.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.
        low_cpu_mem_usage (`bool`): Create empty adapter weights on the meta device (for loading).

    The schedule position is read and set with `set_step` / `schedule_state`; `DecayLoraCallback` (Trainer) and
    `attach_schedule` (custom loops) move it once per optimizer step.
    """

    prefix: str = "decaylora_"
    tuner_layer_cls = DecayLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, peft_config, adapter_name, **kwargs) -> None:
        super().__init__(model, peft_config, adapter_name, **kwargs)
        # Distillation runs from hooks on the wrapped model, so it applies whichever PeftModel class calls it.
        self._teaching = False
        # (weight, whether the caller asked for hidden states) of the forward in flight, set by the pre-hook
        self._pending_distillation = None
        # (step, training forwards seen at it) of the active adapter, to warn when nothing moves the schedule
        self._forwards_at_step = (None, 0)
        self._model_hooks = (
            self.model.register_forward_pre_hook(self._watch_schedule),
            self.model.register_forward_pre_hook(self._request_hidden_states, with_kwargs=True),
            self.model.register_forward_hook(self._add_distillation_loss, with_kwargs=True),
        )

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)  # through __call__, so the distillation hooks run

    def _pre_injection_hook(self, model: nn.Module, config: DecayLoraConfig, adapter_name: str) -> None:
        """Check every targeted module before any is replaced, so that a bad target leaves the model unchanged, and
        count the layer stack once for ``rank_by_depth``."""
        matched, unsupported, shared = [], [], []
        for key, module in model.named_modules():
            if not self._check_target_module_exists(config, key):
                continue
            matched.append(key)
            if isinstance(module, DecayLoraLayer) and (config.init_weights == "svd" or module.decaylora_top_left):
                shared.append(key)
            if isinstance(module, BaseTunerLayer):
                continue
            try:
                layer_kind(module)
            except TypeError as error:
                unsupported.append(f"{key} ({error})")
        if unsupported:
            raise TypeError(
                "DecayLoRA cannot adapt these target modules: " + "; ".join(unsupported) + ". The model was not "
                "changed. Narrow `target_modules` or add the modules to `exclude_modules`."
            )
        if shared:
            raise ValueError(
                f"These layers already carry a DecayLoRA adapter: {shared}. An adapter with init_weights='svd' splits "
                "the frozen weight into its top part and the residual, so it must be the only adapter on its layers. "
                "The model was not changed; use init_weights=True for every adapter that shares a layer."
            )
        if not matched and config.target_modules is not None and not isinstance(config.target_modules, str):
            candidates = sorted({key.rsplit(".", 1)[-1] for key, module in model.named_modules() if _adaptable(module)})
            raise ValueError(
                f"Target modules {sorted(config.target_modules)} match no module of the model. Modules DecayLoRA "
                f"can adapt ({SUPPORTED_LAYERS}) are named: {candidates}."
            )
        self._stack_depth = stack_depth(model, config.layers_pattern) if config.rank_by_depth else None

    def _prepare_adapter_config(self, config: DecayLoraConfig, model_config: dict) -> DecayLoraConfig:
        config = super()._prepare_adapter_config(config, model_config)
        if config.detect_fused_layouts:
            config.fused_layouts = {**detect_fused_layouts(model_config), **(config.fused_layouts or {})}
        return config

    def _create_and_replace(
        self, config: DecayLoraConfig, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r, lora_alpha = config.r, config.lora_alpha
        if config.rank_by_depth:
            index = layer_index(current_key, config.layers_pattern)
            if index is not None:
                r, lora_alpha = rank_at_depth(r, lora_alpha, config.rank_by_depth, index, self._stack_depth)
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), current_key), r)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), current_key)
        lora_alpha = config.alpha_pattern.get(alpha_key, lora_alpha)
        fused_layout = config.fused_layouts.get(get_pattern_key(config.fused_layouts.keys(), current_key))
        fused_enable = config.fused_enable.get(get_pattern_key(config.fused_enable.keys(), current_key))
        if fused_enable is not None and fused_layout is None:
            raise ValueError(
                f"`fused_enable` names {current_key!r}, but no fused layout is known for it; add it to `fused_layouts`."
            )
        kwargs = dict(config=config, r=r, lora_alpha=lora_alpha, fused_layout=fused_layout, fused_enable=fused_enable)
        if isinstance(target, DecayLoraLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = DecayLoraModule(target, adapter_name, layer_key=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _decaylora_layers(self):
        return [module for module in self.model.modules() if isinstance(module, DecayLoraLayer)]

    def _first_layer_of(self, adapter_name: str) -> Optional[DecayLoraLayer]:
        """The first layer carrying ``adapter_name`` (the layers share its schedule and state), found without
        walking the whole model."""
        return next((module for module in self.model.modules()
                     if isinstance(module, DecayLoraLayer) and adapter_name in module.decaylora_step), None)

    def _resolve_adapter(self, adapter_name: Optional[str]) -> str:
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise ValueError(
                    f"Several adapters are active ({self.active_adapters}); pass `adapter_name` explicitly."
                )
            adapter_name = self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}.")
        return adapter_name

    # ------------------------------------------------------------------------------------------------ schedule
    def set_step(self, step: int, adapter_name: Optional[str] = None) -> None:
        """Set the schedule of every adapted layer to optimizer step ``step`` (for the active adapter by default)."""
        if int(step) != step or step < 0:
            raise ValueError(f"`step` must be a non-negative integer, got {step!r}.")
        adapter_name = self._resolve_adapter(adapter_name)
        for layer in self._decaylora_layers():
            if adapter_name in layer.decaylora_step:
                layer.set_step(int(step), [adapter_name])

    def set_total_steps(self, total_steps: int, adapter_name: Optional[str] = None) -> None:
        """Fix the schedule length (optimizer steps of the whole run) that fractional decay points refer to."""
        adapter_name = self._resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        if int(total_steps) != total_steps or total_steps <= 0:
            raise ValueError(f"`total_steps` must be a positive integer, got {total_steps!r}.")
        schedule_bounds(int(total_steps), config.decay_start, config.decay_end)
        config.total_steps = int(total_steps)
        for layer in self._decaylora_layers():
            if adapter_name in layer.decaylora_config:
                layer.decaylora_config[adapter_name].total_steps = int(total_steps)

    def schedule_state(self, adapter_name: Optional[str] = None) -> dict:
        """``{"step", "decay_factor", "noise_active", "noise_scale"}`` of the adapter (the active one by default).

        ``noise_scale`` is the noise standard deviation as a multiple of the weight's: ``sqrt(1 - d^2)`` while noise
        is drawn, else 0.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        layers = [layer for layer in self._decaylora_layers() if adapter_name in layer.decaylora_step]
        if not layers:
            raise ValueError(f"No layer carries adapter {adapter_name!r}.")
        steps = {layer.get_step(adapter_name) for layer in layers}
        if len(steps) != 1:
            raise RuntimeError(f"The layers of adapter {adapter_name!r} are at different steps: {sorted(steps)}.")
        d, scale = layers[0].schedule_point(adapter_name)
        return {"step": steps.pop(), "decay_factor": d, "noise_active": scale > 0.0, "noise_scale": scale}

    def _watch_schedule(self, module, args) -> None:
        """Warn once when many training forwards run at one schedule step: a set ``total_steps`` with neither
        `DecayLoraCallback` nor `attach_schedule` trains plain LoRA and never decays."""
        if self._teaching or not module.training or not torch.is_grad_enabled() or len(self.active_adapters) != 1:
            return
        adapter = self.active_adapters[0]
        layer = self._first_layer_of(adapter)
        if layer is None:
            return
        step = layer.get_step(adapter)
        last_step, seen = self._forwards_at_step
        seen = seen + 1 if step == last_step else 1
        self._forwards_at_step = (step, seen)
        if seen == STALLED_SCHEDULE_FORWARDS:
            warnings.warn(
                f"DecayLoRA adapter {adapter!r}: {seen} training forwards ran at schedule step {step} and nothing "
                "moved it, so the frozen weight is not decaying. Pass `callbacks=[peft_decaylora.DecayLoraCallback()]`"
                " to the Trainer, call `peft_decaylora.attach_schedule(model, optimizer)` in a custom loop, or move it "
                "yourself with `model.base_model.set_step(step)`.",
                stacklevel=2,
            )

    # -------------------------------------------------------------------------------------------- distillation
    def _distillation_weight(self, module: nn.Module, kwargs: dict) -> float:
        """The weight of the distillation term for this forward: 0 unless training with distillation on."""
        if not module.training or len(self.active_adapters) != 1:
            return 0.0
        config = self.peft_config.get(self.active_adapters[0])
        if config is None or config.distillation == "off":
            return 0.0
        usable = isinstance(module, PreTrainedModel) and kwargs.get("labels") is not None
        if config.distillation == "auto" and not usable:
            return 0.0
        if not usable:
            raise ValueError(_DISTILLATION_NEEDS)
        adapter = self.active_adapters[0]
        layer = self._first_layer_of(adapter)
        if layer is None or layer.disable_adapters or layer.merged:
            return 0.0
        fade = layer.decay_factor(adapter) if config.distillation_schedule == "decay" else 1.0
        return float(config.distillation_weight) * fade

    def _request_hidden_states(self, module, args, kwargs):
        if self._teaching:
            return None
        weight = self._distillation_weight(module, kwargs)
        self._pending_distillation = (weight, kwargs.get("output_hidden_states")) if weight else None
        if not weight:
            return None
        kwargs["output_hidden_states"] = True
        return args, kwargs

    def _add_distillation_loss(self, module, args, kwargs, outputs):
        if self._teaching or self._pending_distillation is None:
            return None
        (weight, wants_hidden_states), self._pending_distillation = self._pending_distillation, None
        with torch.no_grad(), self._pretrained_network():
            teacher = module(*args, **kwargs)
        if getattr(outputs, "loss", None) is None or getattr(teacher, "hidden_states", None) is None:
            raise ValueError(_DISTILLATION_NEEDS)
        config = self.peft_config[self.active_adapters[0]]
        outputs.loss = outputs.loss + weight * hidden_state_distillation_loss(
            outputs.hidden_states, teacher.hidden_states, config.distillation_layers
        )
        if not wants_hidden_states:
            outputs.hidden_states = None
        return outputs

    @contextmanager
    def _pretrained_network(self):
        """Run the pretrained network: every DecayLoRA layer computes ``W x + b`` and the model is in eval mode."""
        layers = self._decaylora_layers()
        self._teaching = True
        for layer in layers:
            layer._as_pretrained = True
        try:
            with eval_mode(self.model):
                yield
        finally:
            self._teaching = False
            for layer in layers:
                layer._as_pretrained = False

    # ------------------------------------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge the adapter into every adapted layer, all or nothing: if one layer refuses (``safe_merge`` found
        NaN/inf), the layers merged before it are unmerged again and the error is raised."""
        self._check_merge_allowed()
        merged_now = []
        try:
            for layer in self._decaylora_layers():
                was_merged = layer.merged
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                if layer.merged and not was_merged:
                    merged_now.append(layer)
        except Exception:
            for layer in merged_now:
                layer.unmerge()
            raise

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ):
        # Merge everything first (atomically), then swap the layers for their base layers.
        if merge:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        else:  # give back the pretrained weights that an SVD initialisation split
            for layer in self._decaylora_layers():
                layer.restore_pretrained_weight()
        self._remove_model_hooks()
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    def _remove_model_hooks(self) -> None:
        for handle in self._model_hooks:
            handle.remove()

    # ------------------------------------------------------------------------------------------------ adapters
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(
                f"DecayLoRA runs one active adapter at a time (each adapter decays the frozen weight), got {names}."
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    # --------------------------------------------------------------------------------------------- compression
    def compress_and_unload(self, adapter_name: Optional[str] = None, progressbar: bool = False) -> nn.Module:
        """Replace every adapted layer by its rank-``r`` factorisation (``A`` then ``s * B`` with bias ``C``) and
        return the unloaded base model; every layer must have reached ``d = 0`` with no noise mean, else a
        ``CompressionError`` names the layers and nothing changes. See `peft_decaylora.compress_and_unload`."""
        from .compression import compress_and_unload

        return compress_and_unload(self, adapter_name=adapter_name, progressbar=progressbar)


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


def hidden_state_distillation_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], layers: Optional[list[int]] = None
) -> torch.Tensor:
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


def rank_at_depth(r: int, lora_alpha: float, slope: float, index: int, depth: int) -> tuple[int, float]:
    """``rank_by_depth``'s rank of layer ``index`` of ``depth`` layers, and its alpha, scaled alike so that
    ``lora_alpha / r`` stays."""
    if depth < 2:
        return r, lora_alpha
    rank = max(1, round(r * (1 + slope * (2 * index / (depth - 1) - 1))))
    return rank, lora_alpha * rank / r


def _adaptable(module: nn.Module) -> bool:
    try:
        layer_kind(module)
        return True
    except TypeError:
        return False
