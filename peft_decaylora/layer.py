"""The DecayLoRA layer (docs/method.md, "One layer"): ``d (W x + b) + N x + s B A x + C`` around a frozen Linear, Conv2d
or GPT-2 Conv1D, whose differences are a small *kind*; a fused projection's slices are a ``FusedLayout``."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .fused import FusedLayout
from .noise import NoiseDraws, noisy_frozen_product, weight_statistics
from .schedule import StepBuffers
from .sharding import is_partitioned, require_whole, whole


class LinearKind:
    """``nn.Linear``. Weights are handled in the *canonical* layout ``(out, in, ...)``; ``stored`` gives the base
    layer's own, ``kernel`` the shape of a row of ``A``, ``pointwise`` the trailing dimensions of ``B``."""

    pointwise = ()

    @staticmethod
    def weight(base):
        return base.weight

    @staticmethod
    def stored(canonical):
        return canonical

    @classmethod
    def kernel(cls, base):
        return tuple(cls.weight(base).shape[1:])

    @staticmethod
    def apply(base, x, weight, bias=None):
        """The base layer's operation with ``weight`` and ``bias`` in place of its own (``A x`` with ``A``)."""
        return F.linear(x, weight, bias)

    @staticmethod
    def input_gradient(base, grad, weight, input_shape):
        """The gradient of ``apply`` with respect to its input, which it is linear in."""
        return grad.matmul(weight)

    @staticmethod
    def patches(base, x):
        """The rows the weight multiplies: one per token for a linear layer, ``(N tokens, in)``."""
        return x.reshape(-1, x.shape[-1])

    up = staticmethod(F.linear)  # B h + bias

    @staticmethod
    def product(A, B):
        """The canonical weight of ``up(apply(., A), B)``: ``B A``, each row of ``A`` flattened."""
        return (B.flatten(1) @ A.flatten(1)).view(B.shape[0], *A.shape[1:])


class Conv1DKind(LinearKind):
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""

    @staticmethod
    def weight(base):
        return transpose(base.weight, fan_in_fan_out=True)

    @staticmethod
    def stored(canonical):
        return canonical.T.contiguous()


class Conv2dKind(LinearKind):
    """``nn.Conv2d``: A is a k x k convolution to r channels (the base's stride, padding...), B a 1 x 1 one."""

    pointwise = (1, 1)

    @staticmethod
    def apply(base, x, weight, bias=None):
        return base._conv_forward(x, weight, bias)

    @staticmethod
    def input_gradient(base, grad, weight, input_shape):
        if base.padding_mode == "zeros" and not isinstance(base.padding, str):
            return torch.nn.grad.conv2d_input(input_shape, weight, grad, base.stride, base.padding, base.dilation)
        with torch.enable_grad():  # "same"/"valid" or non-zero padding: differentiate the product at a zero input
            probe = grad.new_zeros(input_shape, requires_grad=True)
            return torch.autograd.grad(base._conv_forward(probe, weight, None), probe, grad)[0]

    @staticmethod
    def patches(base, x):
        """The input patches each output position sees, ``(N positions, in * kh * kw)`` in the kernel's flattened
        order: padded as the layer pads (its own mode, "same" included), then unfolded."""
        mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
        padded = F.pad(x, base._reversed_padding_repeated_twice, mode=mode)
        columns = F.unfold(padded, base.kernel_size, dilation=base.dilation, stride=base.stride)
        return columns.transpose(1, 2).reshape(-1, columns.shape[1])

    up = staticmethod(F.conv2d)  # a 1 x 1 convolution


SUPPORTED_LAYERS = "torch.nn.Linear, torch.nn.Conv2d (groups=1) and transformers.pytorch_utils.Conv1D"


def layer_kind(base: nn.Module) -> type[LinearKind]:
    """The kind of a base layer; ``TypeError`` for layers DecayLoRA does not support."""
    kinds = ((nn.Linear, LinearKind), (Conv1D, Conv1DKind), (nn.Conv2d, Conv2dKind))
    kind = next((kind for cls, kind in kinds if isinstance(base, cls)), None)
    if kind is None:
        raise TypeError(f"layer type {type(base).__name__} is not supported; supported: {SUPPORTED_LAYERS}.")
    if kind is Conv2dKind and base.groups != 1:
        raise TypeError(f"grouped or depthwise Conv2d (groups={base.groups}) is not supported: its kernel cannot "
                        "hold the dense low-rank update. Exclude it with `exclude_modules`.")
    if is_partitioned(base.weight):
        raise TypeError(f"its weight is partitioned by DeepSpeed ZeRO-3 (zero.Init, shape {tuple(base.weight.ds_shape)} "
                        "held as 0 elements), but DecayLoRA reads each whole weight when it adds an adapter (its shape, "
                        "the SVD split, the noise statistics). Load the model without ZeRO-3 init (Accelerate: "
                        "`zero3_init_flag: false`), add the adapter, then let `deepspeed.initialize` or "
                        "`accelerator.prepare` partition it.")
    if not base.weight.is_floating_point():  # bitsandbytes and other integer-packed weights
        raise TypeError(f"{type(base).__name__} holds a quantised {base.weight.dtype} weight, which DecayLoRA cannot "
                        "decay or fold noise into; load the base model in float32, float16 or bfloat16.")
    return kind


def single_active_adapter(names: list[str], available=None) -> Optional[str]:
    """The one active adapter among ``names`` (those in ``available``, if given), or None; several raise."""
    names = [name for name in names if available is None or name in available]
    if len(names) > 1:
        raise ValueError(f"DecayLoRA runs one active adapter at a time (each adapter decays the frozen weight), but "
                         f"{names} are active. Use `set_adapter(name)` with a single name.")
    return names[0] if names else None


class DecayLoraLayer(BaseTunerLayer):
    """The adapters of one layer, per adapter name."""

    adapter_layer_names = ("decaylora_A", "decaylora_B", "decaylora_B0", "decaylora_C")
    other_param_names = ("r", "lora_alpha", "scaling", "decaylora_dropout", "decaylora_step", "decaylora_schedule",
                         "decaylora_noise", "decaylora_noise_mean", "decaylora_noise_std", "fused_layout")

    def __init__(self, base_layer: nn.Module, layer_key: str = "") -> None:
        self.base_layer = base_layer
        self.kind = layer_kind(self.get_base_layer())
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self.layer_key = layer_key
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.decaylora_dropout = nn.ModuleDict({})
        self.decaylora_A, self.decaylora_B = nn.ParameterDict({}), nn.ParameterDict({})
        self.decaylora_B0 = nn.ParameterDict({})  # the SVD start s B0 A, frozen (init_weights="svd" only)
        self.decaylora_C = nn.ParameterDict({})
        self.decaylora_schedule = {}  # the adapter's AdapterSchedule, shared with the tuner and its other layers
        self.decaylora_step = StepBuffers(self.decaylora_schedule)  # the schedule's step, for save and load only
        self.decaylora_noise: dict[str, NoiseDraws] = {}
        self.decaylora_noise_mean = BufferDict({}, persistent=True)  # of the frozen weight that fades, per row
        self.decaylora_noise_std = BufferDict({}, persistent=True)
        self.fused_layout: dict[str, FusedLayout] = {}
        self._disable_adapters, self.merged_adapters = False, []
        self._unmerged: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # base weight and bias

    def update_layer(self, adapter_name: str, config, r: int, lora_alpha: float, schedule,
                     fused_layout: Optional[FusedLayout] = None) -> None:
        """Add adapter ``adapter_name`` with rank ``r`` (per adapted slice of a fused layout)."""
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r} for adapter {adapter_name!r}.")
        base, rows, slices = self.get_base_layer(), self.out_features, 1
        if fused_layout is not None:
            if self.kind is Conv2dKind:
                raise TypeError(f"{self.layer_key}: fused layouts apply to linear projections, not to Conv2d.")
            self.fused_layout[adapter_name] = fused_layout
            rows, slices = sum(fused_layout.slice_sizes), len(fused_layout.slice_sizes)
        self.r[adapter_name], self.lora_alpha[adapter_name], self.scaling[adapter_name] = r, lora_alpha, lora_alpha / r
        self.decaylora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.decaylora_A[adapter_name] = nn.Parameter(torch.empty((r * slices,) + self.kind.kernel(base)))
        self.decaylora_B[adapter_name] = nn.Parameter(torch.zeros((rows, r) + self.kind.pointwise))
        self.decaylora_C[adapter_name] = nn.Parameter(torch.zeros(self.out_features))
        frozen = () if config.bias_compensation else ("decaylora_C",)
        if config.init_weights == "svd":
            self.decaylora_B0[adapter_name] = nn.Parameter(torch.zeros_like(self.decaylora_B[adapter_name]))
            frozen += ("decaylora_B0",)
        self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: frozen}
        self.decaylora_step[adapter_name] = torch.tensor(schedule.step)
        self.decaylora_schedule[adapter_name] = schedule
        self.decaylora_noise[adapter_name] = NoiseDraws(config.noise_seed, self.layer_key)
        if config.noise != "off":  # filled by _initialize, or by loading
            self.decaylora_noise_mean[adapter_name] = torch.zeros(self.out_features)
            self.decaylora_noise_std[adapter_name] = torch.zeros(self.out_features)
        if not self.decaylora_A[adapter_name].is_meta:  # meta: empty, to be loaded (low_cpu_mem_usage)
            self._initialize(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def _initialize(self, adapter_name: str, config) -> None:
        from .svd import split_top  # svd.py builds on this module

        nn.init.kaiming_uniform_(self.decaylora_A[adapter_name], a=math.sqrt(5))
        if config.init_weights is False:
            nn.init.kaiming_uniform_(self.decaylora_B[adapter_name], a=math.sqrt(5))
        if config.init_weights == "svd":
            split_top(self, adapter_name)  # sets A, B and B0
        if config.noise != "off":
            self.set_noise_statistics(adapter_name)

    @torch.no_grad()
    def set_noise_statistics(self, adapter_name: str) -> None:
        """The per-row mean and std of the frozen weight that fades (``W - s B0 A`` at initialisation), which the noise
        keeps; rows of fused slices that are not adapted get none."""
        weight = whole(self.kind.weight(self.get_base_layer())).detach().float()
        layout = self.fused_layout.get(adapter_name)
        if adapter_name in self.decaylora_B0:
            top = (layout or self.kind).product(whole(self.decaylora_A[adapter_name]),
                                                whole(self.decaylora_B0[adapter_name]))
            weight = weight - top.float() * self.scaling[adapter_name]
        mean, std = weight_statistics(weight, self.decaylora_schedule[adapter_name].config.noise_stats,
                                      None if layout is None else layout.slice_ids)
        if layout is not None and layout.row_mask is not None:
            mask = layout.row_mask.to(mean.device)
            mean, std = mean * mask, std * mask
        self.decaylora_noise_mean[adapter_name], self.decaylora_noise_std[adapter_name] = mean, std

    def _row_decay(self, adapter_name: str, d: float, base: nn.Module):
        """``d``, or per output row for a fused layer whose slices that are not adapted keep 1."""
        layout = self.fused_layout.get(adapter_name)
        return d if layout is None else layout.row_decay(d, base.weight.device)

    def _running_adapter(self) -> Optional[str]:
        """The adapter this layer runs unmerged, or None: adapters disabled, merged, or none of it active."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return None
        return None if self.merged else single_active_adapter(self.active_adapters, self.decaylora_A)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._running_adapter()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        schedule, base = self.decaylora_schedule[name], self.get_base_layer()
        d, noise_scale = schedule.point
        A, B, C = self.decaylora_A[name], self.decaylora_B[name], self.decaylora_C[name]
        # the SVD start, W's top part, takes over as W fades; skipped at d = 1 (37 of a warm-up step's 695 operators)
        if d < 1 and name in self.decaylora_B0:
            B = torch.add(B, self.decaylora_B0[name], alpha=1.0 - d)
        if self.scaling[name] != 1:  # skipped at s = 1: 74 operators a step, 10% (training_cost.py --host-bound)
            B = B * self.scaling[name]
        h = self.kind.apply(base, self.decaylora_dropout[name](self._cast_input_dtype(x, A.dtype)), A)
        result = self.fused_layout.get(name, self.kind).up(h, B, C)  # s B A x + C
        decay = self._row_decay(name, d, base)
        if noise_scale:  # + d (W x + b) + N x
            draws = self.decaylora_noise[name] if self.training else None
            result = result + noisy_frozen_product(self.kind, base, x, decay,
                                                   self.decaylora_noise_mean[name] * (1.0 - d),
                                                   self.decaylora_noise_std[name] * noise_scale, draws, schedule)
        elif torch.is_tensor(decay):  # + d (W x + b), d per row
            result = torch.addcmul(result, self.base_layer(x, *args, **kwargs), decay)
        elif decay:  # + d (W x + b); skipped at d = 0, where the layer is exactly rank r
            result = torch.add(result, self.base_layer(x, *args, **kwargs), alpha=decay)
        return result.to(x.dtype)

    def get_delta_weight(self, adapter_name: str, decay: Optional[float] = None) -> torch.Tensor:
        """The adapter's weight ``s (B + (1 - d) B0) A`` at decay ``d`` (default: the current one), canonical layout."""
        d = self.decaylora_schedule[adapter_name].decay if decay is None else decay
        A, B = self.decaylora_A[adapter_name], self.decaylora_B[adapter_name]
        if adapter_name in self.decaylora_B0:
            B = B + (1.0 - d) * self.decaylora_B0[adapter_name]
        return self.fused_layout.get(adapter_name, self.kind).product(A, B) * self.scaling[adapter_name]

    def merged_parameters(self, adapter_name: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The eval-mode layer as one: ``W' = d W + E[N] + s (B + (1 - d) B0) A`` (canonical), ``b' = d b + C``."""
        base, schedule = self.get_base_layer(), self.decaylora_schedule[adapter_name]
        decay = self._row_decay(adapter_name, schedule.decay, base)
        weight = self.kind.weight(base).detach().float()
        column = (-1,) + (1,) * (weight.dim() - 1)
        merged = weight * (decay.view(column) if torch.is_tensor(decay) else decay)
        if schedule.noise_scale:
            merged = merged + (self.decaylora_noise_mean[adapter_name].float() * (1.0 - schedule.decay)).view(column)
        merged = merged + self.get_delta_weight(adapter_name).detach().float()
        C = self.decaylora_C[adapter_name].detach().float()
        if base.bias is not None:
            return merged, base.bias.detach().float() * decay + C
        return merged, (C if bool(C.any()) else None)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the eval-mode layer into the base layer; the original weight and bias are kept, so ``unmerge`` is
        exact even at ``d = 0``. With ``safe_merge`` a result with NaN or inf raises, and the layer is unchanged."""
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.decaylora_A]
        if not adapter_names:
            return
        require_whole(self, self.layer_key, "merge")
        if self.merged or len(adapter_names) > 1:
            raise ValueError(f"DecayLoRA merges one adapter at a time, since each adapter decays the frozen weight; "
                             f"asked to merge {adapter_names} with {self.merged_adapters} merged. Unmerge first.")
        base = self.get_base_layer()
        weight, bias = self.merged_parameters(adapter_names[0])
        if safe_merge and not (weight.isfinite().all() and (bias is None or bias.isfinite().all())):
            raise ValueError(f"NaNs or infs detected in the merged weights of adapter {adapter_names[0]!r}; the "
                             "adapter seems to be broken and the layer was left unchanged.")
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self._unmerged = (base.weight.data, None if base.bias is None else base.bias.data)
        base.weight.data = self.kind.stored(weight.to(**like))
        if bias is not None and base.bias is None:
            base.bias = nn.Parameter(bias.to(**like), requires_grad=False)
        elif bias is not None:
            base.bias.data = bias.to(**like)
        self.merged_adapters.append(adapter_names[0])

    def unmerge(self) -> None:
        """Put the original base weight and bias back, exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        base.weight.data, bias = self._unmerged
        if bias is None:
            base.bias = None
        else:
            base.bias.data = bias
        self._unmerged, self.merged_adapters = None, []

    def __repr__(self) -> str:
        return "decaylora." + super().__repr__()


class DecayLoraModule(nn.Module, DecayLoraLayer):
    """A base layer wrapped with one or more DecayLoRA adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, layer_key: str = "", **adapter_kwargs) -> None:
        super().__init__()
        DecayLoraLayer.__init__(self, base_layer, layer_key=layer_key)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **adapter_kwargs)

    forward = DecayLoraLayer.forward
    __repr__ = DecayLoraLayer.__repr__
