"""The DecayLoRA layer: ``d * (W x + b) + N x + s * B A x + C`` around a frozen Linear, Conv2d or Conv1D.

One layer class serves every supported base layer. What differs between them (weight layout, the frozen product,
the shape of the adapter) lives in a small ``LayerKind``; decay, noise, bias compensation, merging and the schedule
state are written once.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DecayLoraConfig
from .fused import SlicedUpProjection, adapted_row_mask, normalize_layout, slice_ids
from .schedule import is_resolvable, schedule_point


class LayerKind:
    """How one type of base layer stores its weight, runs its frozen product and shapes its adapter.

    The *canonical* weight is ``(out, in, ...)``: output channels first, whatever the storage layout.
    """

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    @staticmethod
    def weight(base: nn.Module) -> torch.Tensor:
        return base.weight

    @staticmethod
    def stored_weight(base: nn.Module, canonical: torch.Tensor) -> torch.Tensor:
        """The canonical weight in the base layer's storage layout."""
        return canonical

    @staticmethod
    def frozen_product(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        return F.linear(x, weight, bias)

    @staticmethod
    def input_gradient(base: nn.Module, grad: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size):
        """The gradient of ``frozen_product`` with respect to its input (it is linear in the input)."""
        return grad.matmul(weight)

    @staticmethod
    def make_adapter(base: nn.Module, in_features: int, out_features: int, r: int) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(in_features, r, bias=False), nn.Linear(r, out_features, bias=False)

    @staticmethod
    def product_of(A: nn.Module, B: nn.Module) -> torch.Tensor:
        """The canonical weight of ``B(A(.))``."""
        return B.weight @ A.weight

    @staticmethod
    def up_projection(B: nn.Module, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``B h + bias`` in one kernel (the bias rides on the product instead of a separate pass)."""
        return F.linear(h, B.weight, bias)

    @staticmethod
    def channel_view(c: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast against the layer output."""
        return c


class LinearKind(LayerKind):
    pass


class Conv1DKind(LayerKind):
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        return base.weight.shape[0], base.weight.shape[1]

    @staticmethod
    def weight(base: nn.Module) -> torch.Tensor:
        return base.weight.T

    @staticmethod
    def stored_weight(base: nn.Module, canonical: torch.Tensor) -> torch.Tensor:
        return canonical.T.contiguous()


class Conv2dKind(LayerKind):
    """``nn.Conv2d``; the adapter is a k x k convolution to r channels, then a 1 x 1 convolution to out channels."""

    @staticmethod
    def features(base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    @staticmethod
    def frozen_product(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        return base._conv_forward(x, weight, bias)

    @staticmethod
    def input_gradient(base: nn.Module, grad: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size):
        if base.padding_mode == "zeros" and not isinstance(base.padding, str):
            return torch.nn.grad.conv2d_input(input_shape, weight, grad, base.stride, base.padding, base.dilation)
        with torch.enable_grad():  # "same"/"valid" or non-zero padding: differentiate the product at a zero input
            probe = grad.new_zeros(input_shape, requires_grad=True)
            return torch.autograd.grad(base._conv_forward(probe, weight, None), probe, grad)[0]

    @staticmethod
    def make_adapter(base: nn.Module, in_features: int, out_features: int, r: int) -> tuple[nn.Module, nn.Module]:
        down = nn.Conv2d(
            in_features,
            r,
            kernel_size=base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            padding_mode=base.padding_mode,
            bias=False,
        )
        return down, nn.Conv2d(r, out_features, kernel_size=1, bias=False)

    @staticmethod
    def product_of(A: nn.Module, B: nn.Module) -> torch.Tensor:
        return torch.einsum("or,rihw->oihw", B.weight[:, :, 0, 0], A.weight)

    @staticmethod
    def up_projection(B: nn.Module, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return B._conv_forward(h, B.weight, bias)

    @staticmethod
    def channel_view(c: torch.Tensor) -> torch.Tensor:
        return c[:, None, None]


SUPPORTED_LAYERS = "torch.nn.Linear, torch.nn.Conv2d (groups=1) and transformers.pytorch_utils.Conv1D"


def layer_kind(base: nn.Module) -> type[LayerKind]:
    """The ``LayerKind`` of a base layer; raises ``TypeError`` for layers DecayLoRA does not support."""
    if isinstance(base, nn.Linear):
        return LinearKind
    if isinstance(base, Conv1D):
        return Conv1DKind
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise TypeError(
                f"grouped or depthwise Conv2d (groups={base.groups}) is not supported: its kernel cannot hold the "
                "dense low-rank update. Exclude it with `exclude_modules`."
            )
        return Conv2dKind
    raise TypeError(f"layer type {type(base).__name__} is not supported; supported: {SUPPORTED_LAYERS}.")


def weight_statistics(weight: torch.Tensor, mode: str, ids: Optional[torch.Tensor] = None):
    """Per-output-channel mean and standard deviation of ``weight`` (canonical layout), shaped to broadcast.

    ``mode="tensor"`` pools the rows of each slice (``ids`` gives every row's slice; the whole tensor when None);
    ``mode="channel"`` gives every output channel its own statistics.
    """
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    if mode == "channel":
        mean, std = rows.mean(dim=1), rows.std(dim=1, unbiased=False)
    else:
        ids = torch.zeros(rows.shape[0], dtype=torch.long) if ids is None else ids.to(rows.device)
        mean, std = torch.empty(rows.shape[0], device=rows.device), torch.empty(rows.shape[0], device=rows.device)
        for slice_id in ids.unique():
            in_slice = ids == slice_id
            mean[in_slice] = rows[in_slice].mean()
            std[in_slice] = rows[in_slice].std(unbiased=False)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return mean.reshape(shape), std.reshape(shape)


class RebuiltWeightProduct(torch.autograd.Function):
    """``frozen_product(x, make_weight(), bias)`` that rebuilds the frozen weight in backward instead of saving it.

    The noisy weight ``d W + N`` is a new W-sized tensor every step; regenerating it from its seed in backward (one
    more noise draw) keeps training memory at LoRA's. Only the input gets a gradient: weight and bias are frozen.
    """

    @staticmethod
    def forward(ctx, x, bias, kind, base, make_weight):
        ctx.kind, ctx.base, ctx.make_weight = kind, base, make_weight
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        return kind.frozen_product(base, x, make_weight(), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_input = None
        if ctx.needs_input_grad[0]:
            weight = ctx.make_weight().to(grad.dtype)
            grad_input = ctx.kind.input_gradient(ctx.base, grad, weight, ctx.input_shape).to(ctx.input_dtype)
        return grad_input, None, None, None, None


def noise_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (the config seed, the layer, the step and the forward within the step)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def build_frozen_weight(weight, decay, mean, std, generator: Optional[torch.Generator], seed: Optional[int]):
    """``decay W + N(mean, std)`` with the noise drawn from ``seed``, or ``decay W + mean`` when ``seed`` is None.

    ``decay``, ``mean`` and ``std`` are floats or per-row columns; float statistics draw in one kernel.
    """
    if seed is None:
        return torch.addcmul(mean, weight, decay) if torch.is_tensor(decay) else torch.add(mean, weight, alpha=decay)
    generator.manual_seed(seed)
    noise = torch.empty_like(weight)
    if torch.is_tensor(std):
        noise.normal_(generator=generator).mul_(std).add_(mean)
    else:
        noise.normal_(mean, std, generator=generator)
    return noise.addcmul_(weight, decay) if torch.is_tensor(decay) else noise.add_(weight, alpha=decay)


class DecayLoraLayer(BaseTunerLayer):
    """Adapter state of one adapted layer, per adapter name."""

    adapter_layer_names = ("decaylora_A", "decaylora_B", "decaylora_C")
    other_param_names = (
        "r",
        "lora_alpha",
        "scaling",
        "decaylora_dropout",
        "decaylora_config",
        "decaylora_step",
        "decaylora_noise_mean",
        "decaylora_noise_std",
        "decaylora_uniform_noise",
        "decaylora_adapted_rows",
        "decaylora_top_left",
        "decaylora_top_right",
        "fused_layout",
    )

    def __init__(self, base_layer: nn.Module, layer_key: str = "") -> None:
        self.base_layer = base_layer
        self.kind = layer_kind(self.get_base_layer())
        self.in_features, self.out_features = self.kind.features(self.get_base_layer())
        self.r = {}
        self.lora_alpha = {}
        self.scaling = {}
        self.decaylora_config: dict[str, DecayLoraConfig] = {}
        self.decaylora_dropout = nn.ModuleDict({})
        self.decaylora_A = nn.ModuleDict({})
        self.decaylora_B = nn.ModuleDict({})
        self.decaylora_C = nn.ParameterDict({})
        # The schedule position is state: a persistent buffer, saved with the adapter and moved with the model.
        self.decaylora_step = BufferDict({}, persistent=True)
        # Statistics of the frozen weight are derived from it, so they are not saved.
        self.decaylora_noise_mean = BufferDict({}, persistent=False)
        self.decaylora_noise_std = BufferDict({}, persistent=False)
        # The same statistics as host floats when every row shares them (no fused slices, noise_stats="tensor"):
        # the draw then scales and shifts in its own kernel, with no per-row tensors and no device read.
        self.decaylora_uniform_noise: dict[str, tuple[float, float]] = {}
        # Fused projections whose slices are not all adapted: 1 for rows that decay, 0 for rows kept frozen.
        self.decaylora_adapted_rows = BufferDict({}, persistent=False)
        # With init_weights="svd" the base layer holds the residual W - top; top = left @ right (derived from W at
        # initialisation, so not saved) is kept to give back W: for the pretrained output and on unload.
        self.decaylora_top_left = BufferDict({}, persistent=False)
        self.decaylora_top_right = BufferDict({}, persistent=False)
        # Set by DecayLoraModel while it runs the pretrained network as a distillation teacher.
        self._as_pretrained = False
        self.fused_layout: dict[str, dict] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.layer_key = layer_key
        # The layer's part of its noise seeds (hashed once: the key never changes).
        self._layer_seed = int.from_bytes(hashlib.blake2b(layer_key.encode(), digest_size=8).digest(), "little")
        # Host-side copies of the step buffers, read every forward without a device sync; each entry is checked
        # against the buffer's identity and version, so loading or assigning the buffer is noticed. Also the number
        # of training forwards since the step last changed (indexes the noise within a step).
        self._host_step: dict[str, tuple[torch.Tensor, int, int]] = {}
        self._forward_index: dict[str, int] = {}
        # The backward pass (autograd graph task) that last recomputed this layer's noisy forward, per adapter.
        self._recomputed_in: dict[str, int] = {}
        # One noise generator per device, reseeded for every draw.
        self._noise_generators: dict[torch.device, torch.Generator] = {}
        self.register_load_state_dict_pre_hook(DecayLoraLayer._load_saved_split)
        # Original base weight and bias while merged, so that unmerge is exact even at d = 0.
        self._unmerge_state: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def update_layer(
        self,
        adapter_name: str,
        config: DecayLoraConfig,
        r: int,
        lora_alpha: float,
        fused_layout: Optional[dict] = None,
        fused_enable: Optional[list[bool]] = None,
    ) -> None:
        """Add (or re-create) adapter ``adapter_name`` with rank ``r`` (per adapted slice, for a fused layout)."""
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r} for adapter {adapter_name!r}.")
        base = self.get_base_layer()
        where = self.layer_key or type(base).__name__
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.decaylora_config[adapter_name] = config
        self.decaylora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        ids = None
        if fused_layout is None:
            A, B = self.kind.make_adapter(base, self.in_features, self.out_features, r)
        else:
            if self.kind is Conv2dKind:
                raise TypeError(f"{where}: fused layouts apply to linear projections, not to Conv2d.")
            fused_layout = normalize_layout(fused_layout, where)
            ids = slice_ids(fused_layout, self.out_features, where)
            enabled = [True] * len(fused_layout["sizes"]) if fused_enable is None else list(fused_enable)
            if len(enabled) != len(fused_layout["sizes"]) or not any(enabled):
                raise ValueError(
                    f"{where}: `fused_enable` needs one True/False per slice of {fused_layout} with at least one "
                    f"True, got {fused_enable!r}."
                )
            self.fused_layout[adapter_name] = {**fused_layout, "enable": enabled}
            A, B = nn.Linear(self.in_features, r * sum(enabled), bias=False), SlicedUpProjection(r, ids, enabled)
            mask = adapted_row_mask(ids, enabled)
            if mask is not None:
                self.decaylora_adapted_rows[adapter_name] = mask
        if (config.init_weights == "svd" and self.decaylora_A) or self.decaylora_top_left:
            raise ValueError(
                f"{where}: init_weights='svd' replaces the frozen weight by its residual, so such an adapter must be "
                "the only one on its layer; use init_weights=True for the other adapters."
            )
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        if config.init_weights is True:
            nn.init.zeros_(B.weight)
        else:
            nn.init.kaiming_uniform_(B.weight, a=math.sqrt(5))
        self.decaylora_A[adapter_name] = A
        self.decaylora_B[adapter_name] = B
        if config.init_weights == "svd":
            self._split_off_top(adapter_name, r, lora_alpha / r)
        self.decaylora_C[adapter_name] = nn.Parameter(torch.zeros(self.out_features))
        if not config.bias_compensation:
            self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: ("decaylora_C",)}
        self.decaylora_step[adapter_name] = torch.zeros((), dtype=torch.long)
        self._set_noise_statistics(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _set_noise_statistics(self, adapter_name: str) -> None:
        """Mean and std of the frozen weight (the part that decays) that the noise of ``adapter_name`` matches."""
        config, layout = self.decaylora_config[adapter_name], self.fused_layout.get(adapter_name)
        weight = self.kind.weight(self.get_base_layer())
        ids = None if layout is None else slice_ids(layout, self.out_features, self.layer_key)
        mean, std = weight_statistics(weight, config.noise_stats, ids)
        if adapter_name in self.decaylora_adapted_rows:  # frozen slices get no noise and no mean shift
            rows = self._as_weight_column(self.decaylora_adapted_rows[adapter_name].to(mean.device), mean)
            mean, std = mean * rows, std * rows
        self.decaylora_noise_mean[adapter_name] = mean
        self.decaylora_noise_std[adapter_name] = std
        self.decaylora_uniform_noise.pop(adapter_name, None)
        if ids is None and config.noise_stats == "tensor":
            self.decaylora_uniform_noise[adapter_name] = (mean.flatten()[0].item(), std.flatten()[0].item())

    @torch.no_grad()
    def _split_off_top(
        self, adapter_name: str, r: int, scaling: float, input_gram: Optional[torch.Tensor] = None
    ) -> None:
        """Start ``s B A`` at the top-``r`` SVD part of ``W`` (of each adapted slice, for a fused layout) and leave
        the residual in the base layer.

        With ``input_gram`` (``E[x x^T]`` of the layer's inputs, ``G = L L^T``) the top part is the rank-``r`` fit of
        ``W x`` on those inputs instead of ``W``: the SVD of ``W L``, mapped back by ``L^-1`` (activation-aware SVD).
        """
        base = self.get_base_layer()
        weight = self.kind.weight(base)
        rows = weight.detach().float().reshape(weight.shape[0], -1)
        whitening = None
        if input_gram is not None:
            # G = V diag(e) V^T, L = V diag(sqrt e). Eigenvalues are floored: fewer calibration tokens than inputs, or
            # float rounding, leave G singular or slightly indefinite.
            eigenvalues, vectors = torch.linalg.eigh(input_gram.to(device=rows.device, dtype=torch.float64))
            spread = eigenvalues.clamp(min=1e-6 * eigenvalues.clamp(min=0).mean()).sqrt()
            whitening, unwhitening = (vectors * spread).to(rows), (vectors / spread).T.to(rows)
        A = self.decaylora_A[adapter_name].weight
        B_module = self.decaylora_B[adapter_name]
        B = B_module.weight.view(B_module.weight.shape[0], -1)  # (rows of B, r): a Conv2d B is (out, r, 1, 1)
        if isinstance(B_module, SlicedUpProjection):  # each adapted slice: its output rows and its rows of B
            blocks = zip(B_module.rows.split(B_module.slice_sizes), torch.arange(B.shape[0]).split(B_module.slice_sizes))
        else:
            blocks = [(torch.arange(rows.shape[0]),) * 2]
        B.zero_()
        lefts, rights = [], []
        for index, (output_rows, b_rows) in enumerate(blocks):
            block = rows[output_rows] if whitening is None else rows[output_rows] @ whitening
            U, S, Vh = torch.linalg.svd(block, full_matrices=False)
            k = min(r, S.numel())  # ranks above the block's rank keep their random A rows and zero B columns
            root = (S[:k] / scaling).sqrt()
            right = Vh[:k]
            if whitening is not None:  # back from the whitened inputs: Vh L^-1
                right = right @ unwhitening
            a = A[index * r : index * r + k]
            a.copy_((root[:, None] * right).reshape(a.shape))
            B[b_rows, :k] = (U[:, :k] * root).to(B.dtype)
            left = rows.new_zeros(rows.shape[0], k)
            left[output_rows] = U[:, :k] * S[:k]
            lefts.append(left)
            rights.append(right)
        left, right = torch.cat(lefts, dim=1), torch.cat(rights)
        residual = (rows - left @ right).reshape(weight.shape).to(weight.dtype)
        base.weight.data = self.kind.stored_weight(base, residual)
        self.decaylora_top_left[adapter_name] = left.to(weight.dtype)
        self.decaylora_top_right[adapter_name] = right.to(weight.dtype)

    def resplit_top(self, adapter_name: str, input_gram: torch.Tensor) -> None:
        """Redo the SVD initialisation of ``adapter_name`` as the rank-``r`` fit of ``W x`` on inputs with second
        moment ``input_gram`` (``in x in``). Resets ``A`` and ``B``: see ``initialize_from_activations``."""
        self.restore_pretrained_weight()
        self._split_off_top(adapter_name, self.r[adapter_name], self.scaling[adapter_name], input_gram)
        self._set_noise_statistics(adapter_name)  # the residual that decays changed
        self._save_top_with_adapter(adapter_name)

    def _save_top_with_adapter(self, adapter_name: str) -> None:
        """Make the top part of ``adapter_name``'s split part of the state dict. A split fitted to data cannot be
        derived from ``W`` again when the adapter is loaded (the plain SVD split can); it costs as many values as A
        and B, and ``_load_saved_split`` splits ``W`` with it on loading."""
        for factors in (self.decaylora_top_left, self.decaylora_top_right):
            factors.register_buffer(adapter_name, factors[adapter_name], persistent=True)

    @staticmethod
    def _load_saved_split(layer, state_dict, prefix, *args) -> None:
        """Before loading a state dict that carries a saved top part (an activation-aware split), split ``W`` with
        it, so that the residual that decays is the one the adapter was trained with."""
        for name in list(layer.decaylora_top_left.keys()):
            # With the adapter name, or without it: PEFT maps a checkpoint key to the adapter's only where the fresh
            # adapter already has that key, and a fresh adapter holds the plain split, which is not saved.
            named = [f"{prefix}decaylora_top_{side}.{name}" for side in ("left", "right")]
            unnamed = [f"{prefix}decaylora_top_{side}" for side in ("left", "right")]
            keys = named if all(key in state_dict for key in named) else unnamed
            if not all(key in state_dict for key in keys):
                continue
            for key, target in zip(keys, named):  # under the adapter's name, so that loading fills the buffers
                state_dict[target] = state_dict.pop(key)
            layer._save_top_with_adapter(name)
            if layer.merged:
                layer.unmerge()
            weight = layer.pretrained_weight()
            left, right = (state_dict[key].to(device=weight.device, dtype=torch.float32) for key in named)
            if (left.shape, right.shape) != (layer.decaylora_top_left[name].shape, layer.decaylora_top_right[name].shape):
                continue  # loading reports the size mismatch, naming the key
            residual = weight.float() - (left @ right).reshape(weight.shape)
            base = layer.get_base_layer()
            base.weight.data = layer.kind.stored_weight(base, residual.to(weight.dtype))
            layer._set_noise_statistics(name)  # loading then fills the top part's buffers with left and right

    def pretrained_weight(self) -> torch.Tensor:
        """The base layer's original weight (canonical layout): ``W``, also while it holds an SVD residual."""
        weight = self.kind.weight(self.get_base_layer()).detach()
        if not self.decaylora_top_left:
            return weight
        (name,) = self.decaylora_top_left.keys()  # an SVD-initialised adapter is alone on its layer
        return weight + (self.decaylora_top_left[name] @ self.decaylora_top_right[name]).reshape(weight.shape)

    def _pretrained_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """What the pretrained layer computes: ``W x + b``."""
        base = self.get_base_layer()
        if not self.decaylora_top_left:
            return base(x, *args, **kwargs)
        return self.kind.frozen_product(base, x, self.pretrained_weight().to(x.dtype), base.bias)

    def restore_pretrained_weight(self) -> None:
        """Put ``W`` back into the base layer (after an SVD initialisation) and drop the top part; unmerges first."""
        if not self.decaylora_top_left:
            return
        if self.merged:
            self.unmerge()
        base = self.get_base_layer()
        base.weight.data = self.kind.stored_weight(base, self.pretrained_weight())
        for name in list(self.decaylora_top_left.keys()):
            del self.decaylora_top_left[name], self.decaylora_top_right[name]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.decaylora_top_left:
            self.restore_pretrained_weight()
        super().delete_adapter(adapter_name)

    @staticmethod
    def _as_weight_column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.reshape((-1,) + (1,) * (like.dim() - 1))

    def row_decay(self, adapter_name: str, d: float):
        """The decay of each output row: ``d`` everywhere, or a vector that is 1 on slices kept frozen."""
        if adapter_name not in self.decaylora_adapted_rows:
            return d
        return 1.0 - self.decaylora_adapted_rows[adapter_name] * (1.0 - d)

    # ----------------------------------------------------------------------------------------------- schedule
    def set_step(self, step: int, adapter_names: Optional[list[str]] = None) -> None:
        """Move the schedule of the given adapters (default: all) to optimizer step ``step``."""
        for name in adapter_names if adapter_names is not None else list(self.decaylora_step.keys()):
            buffer = self.decaylora_step[name].fill_(int(step))
            self._forward_index.pop(name, None)
            self._host_step[name] = (buffer, buffer._version, int(step))  # known on the host: no device read

    def get_step(self, adapter_name: str) -> int:
        """The schedule position of ``adapter_name``, read from its buffer only when the buffer changed."""
        buffer = self.decaylora_step[adapter_name]
        cached = self._host_step.get(adapter_name)
        if cached is None or cached[0] is not buffer or cached[1] != buffer._version:
            if cached is not None and cached[2] != int(buffer):
                self._forward_index.pop(adapter_name, None)
            cached = (buffer, buffer._version, int(buffer))
            self._host_step[adapter_name] = cached
        return cached[2]

    def schedule_point(self, adapter_name: str) -> tuple[float, float]:
        """``(d, noise scale)`` of ``adapter_name`` at its current step; the noise scale is 0 while noise is off."""
        cfg = self.decaylora_config[adapter_name]
        return schedule_point(self.get_step(adapter_name), cfg.total_steps, cfg.decay_start, cfg.decay_end,
                              cfg.min_decay, cfg.decay_shape, cfg.noise, cfg.noise_threshold)

    def decay_factor(self, adapter_name: str) -> float:
        return self.schedule_point(adapter_name)[0]

    def noise_active(self, adapter_name: str) -> bool:
        return self.schedule_point(adapter_name)[1] > 0.0

    # ----------------------------------------------------------------------------------------- frozen weight
    def _noise_generator_seed(self, adapter_name: str) -> int:
        """Seed of this forward's noise. A recomputation inside backward (gradient checkpointing) replays the latest
        forward's seed, which is right only when that is the forward it recomputes: one recomputation per backward."""
        step = self.get_step(adapter_name)
        backward = torch._C._current_graph_task_id()
        index = self._forward_index.get(adapter_name, -1)
        if backward == -1:
            index += 1
            self._forward_index[adapter_name] = index
        elif self._recomputed_in.get(adapter_name) != backward:
            self._recomputed_in[adapter_name] = backward
        else:
            raise RuntimeError(
                f"DecayLoRA layer {self.layer_key!r}: gradient checkpointing recomputed its noisy forward twice in one "
                "backward pass. The noise is drawn anew for every forward and a recomputation can replay only the "
                "latest, so the gradients of the earlier forwards would be wrong. This happens when several forwards "
                "(or several calls of a shared layer) feed one backward: call backward after each forward, disable "
                "gradient checkpointing, or train with noise='off' (the default)."
            )
        return noise_seed(self.decaylora_config[adapter_name].noise_seed, self._layer_seed, step, index)

    def _frozen_weight_builder(
        self, base: nn.Module, adapter_name: str, d: float, noise_std_scale: float, seed: Optional[int]
    ) -> functools.partial:
        """A function that builds ``d W + N``, the noise (std ``noise_std_scale`` times W's) drawn from ``seed``, or
        its expectation ``d W + (1 - d) m`` when None. Everything it reads is bound now, so the backward rebuilds
        exactly the forward's weight, with no lookups."""
        weight = self.kind.weight(base).detach()
        decay = self.row_decay(adapter_name, d)
        if torch.is_tensor(decay):
            decay = self._as_weight_column(decay.to(weight.dtype), weight)
        if seed is not None and adapter_name in self.decaylora_uniform_noise:
            mean, std = self.decaylora_uniform_noise[adapter_name]
            mean, std = (1.0 - d) * mean, noise_std_scale * std
        else:
            mean = self.decaylora_noise_mean[adapter_name].to(weight.dtype) * (1.0 - d)
            std = None if seed is None else self.decaylora_noise_std[adapter_name].to(weight.dtype) * noise_std_scale
        generator = None if seed is None else self._noise_generator(weight.device)
        return functools.partial(build_frozen_weight, weight, decay, mean, std, generator, seed)

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        """This layer's generator for ``device`` (reseeded for every draw)."""
        generator = self._noise_generators.get(device)
        if generator is None:
            generator = self._noise_generators[device] = torch.Generator(device=device)
        return generator

    def _frozen_output(self, x: torch.Tensor, adapter_name: str, *args, **kwargs):
        """The frozen part ``d (W x + b) + N x`` as ``(output, factor)``, to be added as ``factor * output`` (the
        scaling by d rides on that addition); ``output`` is None when the part is exactly zero (d = 0, no noise)."""
        d, noise_std_scale = self.schedule_point(adapter_name)
        if d == 1.0:
            return self.base_layer(x, *args, **kwargs), 1.0
        decay = self.row_decay(adapter_name, d)
        if noise_std_scale == 0.0:
            if torch.is_tensor(decay):
                return self.base_layer(x, *args, **kwargs) * self.kind.channel_view(decay), 1.0
            return (None if d == 0.0 else self.base_layer(x, *args, **kwargs)), d
        # get_base_layer() searches through hasattr, which is slow on a plain layer; search only when nested
        base = self.base_layer if not isinstance(self.base_layer, BaseTunerLayer) else self.get_base_layer()
        bias = None if base.bias is None else base.bias * decay
        seed = self._noise_generator_seed(adapter_name) if self.training else None
        make_weight = self._frozen_weight_builder(base, adapter_name, d, noise_std_scale, seed)
        return RebuiltWeightProduct.apply(x, bias, self.kind, base, make_weight), 1.0

    # ------------------------------------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s B A`` in the canonical ``(out, in, ...)`` layout."""
        A, B = self.decaylora_A[adapter_name], self.decaylora_B[adapter_name]
        product = B.dense_product(A.weight) if isinstance(B, SlicedUpProjection) else self.kind.product_of(A, B)
        return product * self.scaling[adapter_name]

    def merged_parameters(self, adapter_name: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``W' = d W + mu_N + s B A`` (canonical layout) and ``b' = d b + C`` (None if both are absent/zero)."""
        base = self.get_base_layer()
        d = self.decay_factor(adapter_name)
        decay = self.row_decay(adapter_name, d)
        weight = self.kind.weight(base).detach().float()
        column = self._as_weight_column(decay, weight) if torch.is_tensor(decay) else decay
        mean = self.decaylora_noise_mean[adapter_name].float() * (1.0 - d) if self.noise_active(adapter_name) else 0.0
        merged_weight = weight * column + mean + self.get_delta_weight(adapter_name).detach().float()
        C = self.decaylora_C[adapter_name].detach().float()
        if base.bias is not None:
            merged_bias = base.bias.detach().float() * decay + C
        else:
            merged_bias = C if bool(C.any()) else None
        return merged_weight, merged_bias

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the eval-mode layer into the base layer: ``W <- d W + mu_N + s B A``, ``b <- d b + C``.

        The original weight and bias are kept (not copied: the merged ones are new tensors), so ``unmerge`` restores
        them exactly even at ``d = 0``. With ``safe_merge=True`` a merge that would produce NaN or inf raises and
        leaves the layer unchanged.
        """
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.decaylora_A]
        if not adapter_names:
            return
        if self.merged or len(adapter_names) > 1:
            raise ValueError(
                f"DecayLoRA merges one adapter at a time, since each adapter decays the frozen weight; asked to merge "
                f"{adapter_names} with {self.merged_adapters} already merged. Unmerge first."
            )
        adapter_name = adapter_names[0]
        base = self.get_base_layer()
        weight, bias = self.merged_parameters(adapter_name)
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(
                f"NaNs or infs detected in the merged weights of adapter {adapter_name!r}; the adapter seems to be "
                "broken and the layer was left unchanged."
            )
        dtype, device = base.weight.dtype, base.weight.device
        self._unmerge_state = (base.weight.data, None if base.bias is None else base.bias.data)
        base.weight.data = self.kind.stored_weight(base, weight.to(dtype=dtype, device=device))
        if bias is not None:
            bias = bias.to(dtype=dtype, device=device)
            if base.bias is None:
                base.bias = nn.Parameter(bias, requires_grad=False)
            else:
                base.bias.data = bias
        self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Restore the original base weight and bias exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        weight, bias = self._unmerge_state
        base.weight.data = weight
        if bias is None:
            base.bias = None
        else:
            base.bias.data = bias
        self._unmerge_state = None
        self.merged_adapters = []

    # ------------------------------------------------------------------------------------------------ forward
    def _active_adapter_name(self) -> Optional[str]:
        active = self.active_adapters
        if len(active) == 1:  # the common case, without building a list every forward
            return active[0] if active[0] in self.decaylora_A else None
        active = [name for name in active if name in self.decaylora_A]
        if len(active) > 1:
            raise ValueError(
                f"DecayLoRA runs one active adapter at a time (each adapter decays the frozen weight), but {active} "
                "are active. Use `set_adapter(name)` with a single name."
            )
        return active[0] if active else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self._as_pretrained:
            if self.merged:
                self.unmerge()
            return self._pretrained_output(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter_name = self._active_adapter_name()
        if adapter_name is None:
            return self.base_layer(x, *args, **kwargs)
        cfg = self.decaylora_config[adapter_name]
        if self.training and not is_resolvable(cfg.total_steps, cfg.decay_start, cfg.decay_end):
            raise RuntimeError(
                f"DecayLoRA adapter {adapter_name!r} is training without a schedule length: `total_steps` is None "
                f"and decay_start={cfg.decay_start} / decay_end={cfg.decay_end} are fractions of it, so the frozen "
                "weight would never decay. Add `peft_decaylora.DecayLoraCallback()` to the Trainer's callbacks, call "
                "`peft_decaylora.attach_schedule(model, optimizer, total_steps=...)` in a custom loop, or set "
                "`DecayLoraConfig(total_steps=...)`."
            )
        previous_dtype = x.dtype
        frozen, factor = self._frozen_output(x, adapter_name, *args, **kwargs)
        A, B = self.decaylora_A[adapter_name], self.decaylora_B[adapter_name]
        dropout = self.decaylora_dropout[adapter_name]
        x_adapter = self._cast_input_dtype(x if isinstance(dropout, nn.Identity) else dropout(x), A.weight.dtype)
        h = A(x_adapter)
        if self.scaling[adapter_name] != 1.0:
            h = h * self.scaling[adapter_name]  # scale the rank-r activations, the cheapest place
        C = self.decaylora_C[adapter_name]
        result = B(h, C) if isinstance(B, SlicedUpProjection) else self.kind.up_projection(B, h, C)
        if frozen is not None:
            if result.dtype != frozen.dtype:
                result = result.to(frozen.dtype)
            result = torch.add(result, frozen, alpha=factor)
        return result if result.dtype == previous_dtype else result.to(previous_dtype)

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
