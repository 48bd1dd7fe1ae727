"""Configuration of a DecayLoRA adapter."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .fused import normalize_layout
from .peft_type import extend_peft_type
from .schedule import schedule_bounds


@dataclass
class DecayLoraConfig(PeftConfig):
    """
    Configuration of a [`DecayLoraModel`]: LoRA whose frozen pretrained weight fades out on a schedule, so that each
    adapted layer ends as an exact rank-``r`` layer. Each computes ``d * (W x + b) + N x + s * B A x + C``,
    ``s = lora_alpha / r``: ``d`` goes from 1 to ``min_decay`` on a warm-up / decay / cool-down schedule of optimizer
    steps, the noise ``N`` keeps the effective weight's mean and variance at ``W``'s while ``W`` fades, and the
    trainable bias ``C`` takes over from ``b``.

    Args:
        r (`int`): Rank of the adapter, i.e. the rank of each adapted layer once ``d`` reaches 0.
        lora_alpha (`float`): Scale numerator, ``s = lora_alpha / r``.
        lora_dropout (`float`): Dropout on the adapter's input, in [0, 1).
        target_modules (`Optional[Union[list[str], str]]`): Names (or a regex) of the modules to adapt, as in
            `LoraConfig`; ``"all-linear"`` adapts every linear layer but the output layer.
        exclude_modules (`Optional[Union[list[str], str]]`): Names (or a regex) of modules never to adapt.
        layers_to_transform (`Union[list[int], int]`): Indices of the layers to adapt.
        layers_pattern (`Optional[Union[list[str], str]]`): Name of the layer list, used with `layers_to_transform`.
        keep_fraction (`Optional[float]`): In (0, 1]: give each adapted layer the rank that keeps this fraction of its
            parameters once compressed, ``r (in + out) = keep_fraction * in * out`` (``in`` counts every input of a
            kernel; the adapted slices of a fused projection share one rank, from their total), rounded, at least 1; 0.8
            is SVD-LLM's "20% compression". ``lora_alpha / r`` stays the scale. None (default): ``r``.
        rank_pattern (`dict`): Module name or regex -> rank, overriding `r`.
        alpha_pattern (`dict`): Module name or regex -> alpha, overriding `lora_alpha`.
        rank_by_depth (`float`): In [-1, 1]: moves rank along the layer stack at the same total. Layer ``i`` of ``L``
            (its index counted as for `layers_to_transform`) gets ``round(r * (1 + rank_by_depth * (2 i / (L - 1) -
            1)))``, at least 1, and ``lora_alpha`` scaled alike; negative values favour the bottom layers. Modules
            outside the stack keep ``r``; `rank_pattern` / `alpha_pattern` win. 0.0 (default): one rank everywhere.
        init_weights (`Union[bool, str]`): "svd" (default): the adapter starts from the best rank-``r`` approximation
            of ``W`` (per adapted slice of a fused layout), which takes over as ``W`` fades: the layer computes
            ``s (B + (1 - d) B0) A`` with ``s B0 A`` that top part (``B0`` frozen, saved with the adapter) and ``B``
            starting at 0. Step 0 is the base model exactly, and ``W`` is never changed. Its factors are as large as
            ``W``'s singular values: use about half of LoRA's learning rate (5e-4 where LoRA takes 1e-3).
            True: ``A`` Kaiming-uniform and ``B = 0``, no ``B0``. False: ``B`` random too (for tests).
        total_steps (`Optional[int]`): Optimizer steps of the whole run; fractional `decay_start` / `decay_end` are
            relative to it. May stay None until training: `DecayLoraCallback` fills it from the Trainer.
        decay_start (`Union[int, float]`): First step of the linear decay; a float in [0, 1] is a fraction of
            `total_steps`, an int a step number.
        decay_end (`Union[int, float, str]`): First step of the cool-down, where ``d = min_decay``. "auto" (default):
            0.3 for transformers causal LMs, 0.9 for other transformers models, 0.5 for any other model (e.g. a
            torchvision network), each the best measured on its kind (docs/method.md, "A new task"); filled in when
            the adapter is added, so the saved config holds the number.
        min_decay (`float`): Decay factor of the cool-down, in [0, 1]. 0 (default) ends with a pure rank-r layer.
        decay_shape (`str`): How ``d`` goes from 1 to `min_decay` between `decay_start` and `decay_end`: "linear"
            (default) or "cosine" (``(1 + cos(pi t)) / 2`` of the progress ``t``: slow at both ends).
        noise (`str`): "off" (default: decay alone), "vanish" (noise while ``d >= noise_threshold``: the original
            specification's default, which cost accuracy in every configuration measured, docs/ablations.md) or "keep"
            (noise for every ``d < 1``, whose mean stays: never exactly rank ``r``, so merge rather than compress).
        noise_threshold (`float`): Decay factor below which "vanish" stops the noise, in [0, 1].
        noise_stats (`str`): Statistics the noise matches: "tensor" (mean and std of the whole weight, or of each
            slice of a fused projection) or "channel" (per output channel).
        noise_seed (`int`): Seed of the noise. The noise is a function of the seed, the layer, the optimizer step and
            the forward pass within the step, so resumed runs and data-parallel ranks draw the same noise.
        bias_compensation (`bool`): Whether ``C`` is trainable. If False, ``C`` stays 0.
        fused_layouts (`dict`): Module name or regex -> slice layout of a fused QKV projection: a list of slice sizes
            (contiguous, e.g. ``[768, 768, 768]``) or ``{"sizes": [...], "repeat": n}`` for slices interleaved per head
            or group. Noise statistics are per slice; each adapted slice gets its own rank-``r`` adapter.
        detect_fused_layouts (`bool`): Fill in the layouts of known architectures (GPT-2 ``c_attn``, Phi-3
            ``qkv_proj``, GPT-NeoX and Falcon ``query_key_value``) from the model config. Explicit entries win.
        fused_enable (`dict`): Module name or regex -> one bool per slice of the layout: which slices are adapted
            (loralib's ``enable_lora``). Slices that are not adapted keep their frozen weight at every step, without
            decay or noise, and stay dense after compression.
        distillation (`str`): "hidden_states": in training mode the model's loss gains ``distillation_weight`` times
            the mean squared difference, normalised by the teacher's mean square, between the hidden states (at
            ``distillation_layers``) of the adapted network and of the pretrained one (the same model with the
            adapters bypassed, in eval mode, without gradients): one extra forward per step that holds what the fading
            ``W`` carried. The model must be a transformers model called with ``labels`` that returns ``loss``, else
            the forward raises. "logits": the same teacher, and the term is instead ``KL(teacher || student)`` of the
            output distributions, per trained token of a causal LM (labels of -100 skipped), meant to keep the
            pretrained model's general text while a domain is learnt (a little, on the one LLM run measured).
            "auto" (default): "hidden_states" where that holds, except for causal LMs (whose teacher forward is the
            costliest, and whose TRL trainers compute the loss themselves); no teacher otherwise. "off": no teacher.
        distillation_weight (`float`): Weight of the distillation term, >= 0 (default 3).
        distillation_schedule (`str`): "constant" (default): the weight stays ``distillation_weight`` throughout.
            "decay": it fades with the frozen weight, ``distillation_weight * d``, so the teacher lets go of the
            representations as ``W`` leaves them and none pulls back in the cool-down at ``d = 0``.
        distillation_layers (`Optional[list[int]]`): Indices of the transformer layers whose outputs are distilled,
            as in Python (0 is the first layer, -1 the last). Default ``[-1]``: the last layer only, which anchors the
            features the task head reads and leaves the layers below free to adapt; ``None``: every layer's.
        modules_to_save (`Optional[list[str]]`): Modules besides the adapters to train and save (e.g. a classifier).
    """

    # Each field's meaning is in the docstring above: the one place of the reference.
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    keep_fraction: Optional[float] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    rank_by_depth: float = 0.0
    init_weights: Union[bool, Literal["svd"]] = "svd"
    total_steps: Optional[int] = None
    decay_start: Union[int, float] = 0.1
    decay_end: Union[int, float, Literal["auto"]] = "auto"
    min_decay: float = 0.0
    decay_shape: Literal["linear", "cosine"] = "linear"
    noise: Literal["vanish", "keep", "off"] = "off"
    noise_threshold: float = 0.3
    noise_stats: Literal["tensor", "channel"] = "tensor"
    noise_seed: int = 0
    bias_compensation: bool = True
    fused_layouts: Optional[dict] = field(default_factory=dict)
    detect_fused_layouts: bool = True
    fused_enable: Optional[dict] = field(default_factory=dict)
    distillation: Literal["auto", "hidden_states", "logits", "off"] = "auto"
    distillation_weight: float = 3.0
    distillation_schedule: Literal["constant", "decay"] = "constant"
    distillation_layers: Optional[list[int]] = field(default_factory=lambda: [-1])
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = extend_peft_type()
        for name in ("target_modules", "exclude_modules"):  # lists become sets, as in LoraConfig
            if isinstance(getattr(self, name), list):
                setattr(self, name, set(getattr(self, name)))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        self._validate()

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Read configs saved before ``distillation_layers`` (all layers distilled) or ``rank_by_depth`` existed."""
        kwargs.setdefault("distillation_layers", None)
        kwargs.setdefault("rank_by_depth", 0.0)
        return super().check_kwargs(**kwargs)

    def _validate(self) -> None:
        positive = {"r": self.r, "lora_alpha": self.lora_alpha, "total_steps": self.total_steps,
                    **{f"rank_pattern[{k!r}]": v for k, v in (self.rank_pattern or {}).items()},
                    **{f"alpha_pattern[{k!r}]": v for k, v in (self.alpha_pattern or {}).items()}}
        for name, value in positive.items():
            whole = not name.startswith(("lora_alpha", "alpha_pattern"))  # ranks and total_steps are counts
            if not (name == "total_steps" and value is None) and not (_is_number(value, whole) and value > 0):
                raise ValueError(f"`{name}` must be a positive {'integer' if whole else 'number'}, got {value!r}.")
        for name, (low, high, how) in RANGES.items():
            if getattr(self, name) is not None or name != "keep_fraction":
                _check_range(name, getattr(self, name), low, high, how)
        for name, choices in CHOICES.items():
            if (value := getattr(self, name)) not in choices:
                raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
        for name in ("decay_start", "decay_end"):
            if not (name == "decay_end" and self.decay_end == "auto"):
                _check_schedule_point(name, getattr(self, name))
        if not _is_number(self.noise_seed, integer=True):
            raise ValueError(f"`noise_seed` must be an integer, got {self.noise_seed!r}.")
        for name in ("bias_compensation", "detect_fused_layouts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        for name, layout in (self.fused_layouts or {}).items():
            normalize_layout(layout, f"`fused_layouts[{name!r}]`")
        for name, flags in (self.fused_enable or {}).items():
            if not isinstance(flags, (list, tuple)) or not all(isinstance(on, bool) for on in flags) or not any(flags):
                raise ValueError(f"`fused_enable[{name!r}]` must be a list of True/False, one per slice, with at least "
                                 f"one True; got {flags!r}.")
        layers = self.distillation_layers
        if layers is not None and not (isinstance(layers, (list, tuple)) and layers and all(
                _is_number(i, integer=True) for i in layers)):
            raise ValueError(f"`distillation_layers` must be None (every layer) or a non-empty list of layer indices "
                             f"(negative ones count from the top, -1 is the last layer), got {layers!r}.")
        start, end = self.decay_start, self.decay_end
        if end == "auto":  # checked once the model fills it in
            return
        if isinstance(start, float) == isinstance(end, float) and start > end:
            raise ValueError(f"`decay_start` ({start}) must not be after `decay_end` ({end}).")
        if self.total_steps is not None:
            schedule_bounds(self.total_steps, self.decay_start, self.decay_end)


# field -> (low, high, which ends are open: "", "low", "high"); and field -> the values it takes
RANGES = {"lora_dropout": (0.0, 1.0, "high"), "rank_by_depth": (-1.0, 1.0, ""), "keep_fraction": (0.0, 1.0, "low"),
          "min_decay": (0.0, 1.0, ""), "noise_threshold": (0.0, 1.0, ""),
          "distillation_weight": (0.0, float("inf"), "")}
CHOICES = {"init_weights": (True, False, "svd"), "decay_shape": ("linear", "cosine"),
           "noise": ("vanish", "keep", "off"), "noise_stats": ("tensor", "channel"),
           "distillation": ("auto", "hidden_states", "logits", "off"), "distillation_schedule": ("constant", "decay")}


def _is_number(value, integer: bool = False) -> bool:
    return isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)


def _check_range(name: str, value, low: float, high: float, open_end: str = "") -> None:
    ok = _is_number(value) and (low < value if open_end == "low" else low <= value) and (
        value < high if open_end == "high" else value <= high)
    if not ok:
        interval = ("(" if open_end == "low" else "[") + f"{low:g}, {high:g}" + (")" if open_end == "high" else "]")
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}.")


def _check_schedule_point(name: str, value) -> None:
    if not _is_number(value):
        choices = " or 'auto' (by kind of model)" if name == "decay_end" else ""
        raise ValueError(f"`{name}` must be a float in [0, 1] (fraction of total_steps) or an int >= 0 (step){choices}, "
                         f"got {value!r}.")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` is a float, i.e. a fraction of total_steps, and must be in [0, 1], got {value!r}.")
    if isinstance(value, numbers.Integral) and value < 0:
        raise ValueError(f"`{name}` is an int, i.e. a step number, and must be >= 0, got {value!r}.")
