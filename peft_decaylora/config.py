"""Configuration of a DecayLoRA adapter."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .fused import normalize_layout
from .peft_type import extend_peft_type
from .schedule import schedule_bounds

NOISE_MODES = ("vanish", "keep", "off")
DECAY_SHAPES = ("linear", "cosine")
NOISE_STATS = ("tensor", "channel")
DISTILLATION = ("auto", "hidden_states", "off")
DISTILLATION_SCHEDULES = ("constant", "decay")


@dataclass
class DecayLoraConfig(PeftConfig):
    """
    Configuration of a [`DecayLoraModel`]: LoRA whose frozen pretrained weight fades out on a schedule, so that each
    adapted layer ends as an exact rank-``r`` layer.

    Every adapted layer computes ``d * (W x + b) + N x + s * B A x + C``. The decay factor ``d`` goes from 1 to
    ``min_decay`` on a warm-up / linear-decay / cool-down schedule driven by optimizer steps; Gaussian noise ``N``
    keeps the effective weight's mean and variance equal to ``W``'s while ``W`` fades; ``C`` is a trainable bias that
    takes over from the decaying bias ``b``. ``s = lora_alpha / r``.

    Args:
        r (`int`): Rank of the adapter, i.e. the rank of each adapted layer once ``d`` reaches 0.
        lora_alpha (`float`): Scale numerator, ``s = lora_alpha / r``.
        lora_dropout (`float`): Dropout on the adapter's input, in [0, 1).
        target_modules (`Optional[Union[list[str], str]]`): Names (or a regex) of the modules to adapt, as in
            `LoraConfig`; ``"all-linear"`` adapts every linear layer but the output layer.
        exclude_modules (`Optional[Union[list[str], str]]`): Names (or a regex) of modules never to adapt.
        layers_to_transform (`Union[list[int], int]`): Indices of the layers to adapt.
        layers_pattern (`Optional[Union[list[str], str]]`): Name of the layer list, used with `layers_to_transform`.
        rank_pattern (`dict`): Module name or regex -> rank, overriding `r`.
        alpha_pattern (`dict`): Module name or regex -> alpha, overriding `lora_alpha`.
        rank_by_depth (`float`): Moves rank between the bottom and the top of the layer stack at the same total, in
            [-1, 1]. The adapted modules of layer ``i`` of ``L`` get rank ``round(r * (1 + rank_by_depth * (2 i /
            (L - 1) - 1)))`` (at least 1) and ``lora_alpha`` scaled alike, so ``s`` stays ``lora_alpha / r``.
            Negative values give the bottom layers more rank. The layer index is the first number in the module's
            name, or the one after `layers_pattern`, as for `layers_to_transform`; ``L`` is one more than the
            largest index in the model. Modules outside the layer stack keep ``r``; `rank_pattern` and
            `alpha_pattern` entries win. 0.0 (default): the same rank everywhere.
        init_weights (`Union[bool, str]`): "svd" (default): ``s B A`` starts as the best rank-``r`` approximation of
            ``W`` (its top singular vectors; per adapted slice of a fused layout) and the frozen weight becomes the
            residual ``W - s B A``, which is what decays. Step 0 still reproduces the base model, and the adapter
            starts from what the compressed layer should keep. The base layer holds the residual while the adapter
            is attached (so such an adapter must be the only one on its layers); `unload()` restores ``W`` up to
            float rounding. Its factors are as large as ``W``'s singular values: use a learning rate about half of
            LoRA's (5e-4 where LoRA takes 1e-3). True: METHOD.md's ``A`` Kaiming-uniform and ``B = 0``. False:
            ``B`` random too (for tests).
        total_steps (`Optional[int]`): Optimizer steps of the whole run; fractional `decay_start` / `decay_end` are
            relative to it. May stay None until training: `DecayLoraCallback` fills it from the Trainer.
        decay_start (`Union[int, float]`): First step of the linear decay; a float in [0, 1] is a fraction of
            `total_steps`, an int a step number.
        decay_end (`Union[int, float]`): First step of the cool-down, where ``d = min_decay``.
        min_decay (`float`): Decay factor of the cool-down, in [0, 1]. 0 (default) ends with a pure rank-r layer.
        decay_shape (`str`): How ``d`` goes from 1 to `min_decay` between `decay_start` and `decay_end`: "linear"
            (default, METHOD.md) or "cosine" (``(1 + cos(pi t)) / 2`` of the progress ``t``: slow at both ends).
        noise (`str`): "off" (default: decay alone), "vanish" (noise while ``d >= noise_threshold``; METHOD.md's
            default, which cost accuracy in every configuration measured in BENCHMARKS.md) or "keep" (noise for
            every ``d < 1``; the noise mean stays, so the model is never exactly rank ``r`` and cannot be compressed).
        noise_threshold (`float`): Decay factor below which "vanish" stops the noise, in [0, 1].
        noise_stats (`str`): Statistics the noise matches: "tensor" (mean and std of the whole weight, or of each
            slice of a fused projection) or "channel" (per output channel).
        noise_seed (`int`): Seed of the noise. The noise is a function of the seed, the layer, the optimizer step and
            the forward pass within the step, so resumed runs and data-parallel ranks draw the same noise.
        bias_compensation (`bool`): Whether ``C`` is trainable. If False, ``C`` stays 0.
        fused_layouts (`dict`): Module name or regex -> slice layout of a fused projection whose output concatenates
            query, key and value: a list of slice sizes (contiguous, e.g. ``[768, 768, 768]``) or
            ``{"sizes": [...], "repeat": n}`` for slices interleaved per head or group. Noise statistics are taken
            per slice and each adapted slice gets its own rank-``r`` adapter.
        detect_fused_layouts (`bool`): Fill in the layouts of known architectures (GPT-2 ``c_attn``, Phi-3
            ``qkv_proj``, GPT-NeoX and Falcon ``query_key_value``) from the model config. Explicit entries win.
        fused_enable (`dict`): Module name or regex -> one bool per slice of the layout: which slices are adapted
            (loralib's ``enable_lora``). Slices that are not adapted keep their frozen weight at every step, without
            decay or noise, and stay dense after compression.
        distillation (`str`): "hidden_states": in training mode the model's loss gains ``distillation_weight`` times
            the mean squared difference between the hidden states of the adapted network and those of the pretrained
            network (the same model with the adapters bypassed, in eval mode, without gradients) at the layers
            ``distillation_layers`` names, each layer's normalised by the teacher's mean square. This holds the
            representations that the fading ``W`` carried while the adapter takes over; it costs one extra forward
            pass per step. The model must return ``loss`` and ``hidden_states`` (transformers models called with
            ``labels``), else the forward raises. "auto" (default): "hidden_states" for a transformers model called
            with ``labels``, no teacher otherwise (plain modules, calls without labels). "off": no teacher.
        distillation_weight (`float`): Weight of the distillation term, >= 0 (default 3).
        distillation_schedule (`str`): "constant" (default): the weight stays ``distillation_weight`` throughout.
            "decay": it fades with the frozen weight, ``distillation_weight * d``, so the teacher lets go of the
            representations as ``W`` leaves them and none pulls back in the cool-down at ``d = 0``.
        distillation_layers (`Optional[list[int]]`): Indices of the transformer layers whose outputs are distilled,
            as in Python (0 is the first layer, -1 the last). Default ``[-1]``: the last layer only, which anchors the
            features the task head reads and leaves the layers below free to adapt; ``None``: every layer's.
        modules_to_save (`Optional[list[str]]`): Modules besides the adapters to train and save (e.g. a classifier).
    """

    r: int = field(default=8, metadata={"help": "DecayLoRA rank: the rank of each adapted layer at the end."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: the adapter is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names or a regex of module names to adapt, e.g. ['query', 'value'], or 'all-linear'."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of module names not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt; all if None."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with `layers_to_transform`, e.g. 'layers'."}
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Module name or regex -> rank, overriding `r`."}
    )
    alpha_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Module name or regex -> alpha, overriding `lora_alpha`."}
    )
    rank_by_depth: float = field(
        default=0.0,
        metadata={"help": "In [-1, 1]: moves rank to the bottom layers (negative) or the top ones (positive) at the "
                  "same total; 0: the same rank everywhere."},
    )
    init_weights: Union[bool, Literal["svd"]] = field(
        default="svd",
        metadata={"help": "True: B = 0. 'svd': s B A starts as the top-r part of W and the residual decays. Both "
                  "reproduce the base model at step 0."},
    )
    total_steps: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps of the run; filled in by DecayLoraCallback when None."}
    )
    decay_start: Union[int, float] = field(
        default=0.1, metadata={"help": "Start of the linear decay: float = fraction of total_steps, int = step."}
    )
    decay_end: Union[int, float] = field(
        default=0.9, metadata={"help": "End of the linear decay: float = fraction of total_steps, int = step."}
    )
    min_decay: float = field(default=0.0, metadata={"help": "Decay factor after decay_end, in [0, 1]."})
    decay_shape: Literal["linear", "cosine"] = field(
        default="linear", metadata={"help": "Shape of the decay from 1 to min_decay: 'linear' or 'cosine'."}
    )
    noise: Literal["vanish", "keep", "off"] = field(
        default="off", metadata={"help": "Noise schedule: 'off', 'vanish' or 'keep'."}
    )
    noise_threshold: float = field(
        default=0.3, metadata={"help": "With noise='vanish', no noise once the decay factor is below this."}
    )
    noise_stats: Literal["tensor", "channel"] = field(
        default="tensor", metadata={"help": "Noise statistics per weight tensor (or fused slice) or per channel."}
    )
    noise_seed: int = field(default=0, metadata={"help": "Seed of the reproducible noise sequence."})
    bias_compensation: bool = field(default=True, metadata={"help": "Train the compensation bias C."})
    fused_layouts: Optional[dict] = field(
        default_factory=dict,
        metadata={"help": "Module name or regex -> slice layout of a fused QKV projection (list of sizes, or "
                  "{'sizes': [...], 'repeat': n})."},
    )
    detect_fused_layouts: bool = field(
        default=True, metadata={"help": "Detect fused QKV layouts of known architectures from the model config."}
    )
    fused_enable: Optional[dict] = field(
        default_factory=dict,
        metadata={"help": "Module name or regex -> which slices of a fused projection are adapted, e.g. "
                  "[True, False, True]."},
    )
    distillation: Literal["auto", "hidden_states", "off"] = field(
        default="auto",
        metadata={"help": "'hidden_states': distil the pretrained network's hidden states while W fades; 'auto': do "
                  "so for transformers models called with labels."},
    )
    distillation_weight: float = field(default=3.0, metadata={"help": "Weight of the distillation loss, >= 0."})
    distillation_schedule: Literal["constant", "decay"] = field(
        default="constant",
        metadata={"help": "'constant': the distillation weight throughout; 'decay': the weight times d, fading with W."},
    )
    distillation_layers: Optional[list[int]] = field(
        default_factory=lambda: [-1],
        metadata={"help": "Indices of the layers whose outputs are distilled; [-1] (default): the last layer; None: "
                  "every layer."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save, e.g. a classifier head."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        self._validate()

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Read a saved config: one written before ``distillation_layers`` existed distilled every layer (``None``),
        and one written before ``rank_by_depth`` existed has the same rank everywhere (0.0)."""
        kwargs.setdefault("distillation_layers", None)
        kwargs.setdefault("rank_by_depth", 0.0)
        return super().check_kwargs(**kwargs)

    def _validate(self) -> None:
        _check_positive_int("r", self.r)
        _check_positive_number("lora_alpha", self.lora_alpha)
        _check_range("lora_dropout", self.lora_dropout, 0.0, 1.0, right_open=True)
        for name, value in (self.rank_pattern or {}).items():
            _check_positive_int(f"rank_pattern[{name!r}]", value)
        for name, value in (self.alpha_pattern or {}).items():
            _check_positive_number(f"alpha_pattern[{name!r}]", value)
        _check_range("rank_by_depth", self.rank_by_depth, -1.0, 1.0)
        if self.total_steps is not None:
            _check_positive_int("total_steps", self.total_steps)
        for name in ("decay_start", "decay_end"):
            _check_schedule_point(name, getattr(self, name))
        _check_range("min_decay", self.min_decay, 0.0, 1.0)
        _check_choice("decay_shape", self.decay_shape, DECAY_SHAPES)
        _check_choice("noise", self.noise, NOISE_MODES)
        _check_range("noise_threshold", self.noise_threshold, 0.0, 1.0)
        _check_choice("noise_stats", self.noise_stats, NOISE_STATS)
        if not isinstance(self.noise_seed, numbers.Integral) or isinstance(self.noise_seed, bool):
            raise ValueError(f"`noise_seed` must be an integer, got {self.noise_seed!r}.")
        for name, layout in (self.fused_layouts or {}).items():
            normalize_layout(layout, f"`fused_layouts[{name!r}]`")
        for name, enabled in (self.fused_enable or {}).items():
            if not isinstance(enabled, (list, tuple)) or not all(isinstance(e, bool) for e in enabled) or not any(enabled):
                raise ValueError(
                    f"`fused_enable[{name!r}]` must be a list of True/False, one per slice, with at least one True; "
                    f"got {enabled!r}."
                )
        if not (isinstance(self.init_weights, bool) or self.init_weights == "svd"):
            raise ValueError(f"`init_weights` must be True, False or 'svd', got {self.init_weights!r}.")
        _check_choice("distillation", self.distillation, DISTILLATION)
        _check_range("distillation_weight", self.distillation_weight, 0.0, float("inf"))
        _check_choice("distillation_schedule", self.distillation_schedule, DISTILLATION_SCHEDULES)
        layers = self.distillation_layers
        if layers is not None and not (isinstance(layers, (list, tuple)) and layers and all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers)):
            raise ValueError(
                f"`distillation_layers` must be None (every layer) or a non-empty list of layer indices (negative "
                f"ones count from the top, -1 is the last layer), got {layers!r}."
            )
        for name in ("bias_compensation", "detect_fused_layouts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        same_kind = isinstance(self.decay_start, float) == isinstance(self.decay_end, float)
        if same_kind and self.decay_start > self.decay_end:
            raise ValueError(
                f"`decay_start` ({self.decay_start}) must not be after `decay_end` ({self.decay_end})."
            )
        if self.total_steps is not None:
            schedule_bounds(self.total_steps, self.decay_start, self.decay_end)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_positive_number(name: str, value) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.")


def _check_range(name: str, value, low: float, high: float, right_open: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and low <= value and (value < high if right_open else value <= high)
    if not ok:
        interval = f"[{low}, {high})" if right_open else f"[{low}, {high}]"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}, got {value!r}.")


def _check_schedule_point(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a float in [0, 1] (fraction of total_steps) or an int >= 0 (step), got {value!r}.")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` is a float, i.e. a fraction of total_steps, and must be in [0, 1], got {value!r}.")
    if isinstance(value, numbers.Integral) and value < 0:
        raise ValueError(f"`{name}` is an int, i.e. a step number, and must be >= 0, got {value!r}.")
