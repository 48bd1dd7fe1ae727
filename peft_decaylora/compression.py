"""Compression: turn a fully decayed DecayLoRA model into a smaller model, save it and load it back.

At ``d = 0`` with no noise mean, an adapted layer computes exactly ``x -> s * B(A x) + C`` (METHOD.md,
"Compression"). :func:`compress_layer` turns one such layer into a :class:`CompressedLayer` ``down -> up``, where
``down`` is a copy of ``A`` and ``up`` is ``B`` scaled by ``s`` with bias ``C``:

- ``Linear(in, out)`` and transformers' ``Conv1D`` -> ``Linear(in, r, bias=False)``, ``Linear(r, out)``:
  ``r * (in + out) + out`` parameters instead of ``in * out + out``;
- ``Conv2d(in, out, k)`` -> ``Conv2d(in, r, k, bias=False)`` (the base's stride, padding, dilation, padding mode),
  ``Conv2d(r, out, 1)``: ``r * (in * k * k + out) + out`` parameters;
- a fused projection (e.g. GPT-2 ``c_attn``) -> one rank-``r`` factorisation per adapted slice
  (``r * (in + out_i)`` each) plus the bias ``C``; slices that were not adapted keep their frozen rows of ``W``
  and ``b``, dense.

:func:`compress_and_unload` does this for every adapted layer of a model (checking every layer before replacing any)
and unloads the rest of PEFT, like ``merge_and_unload``. :func:`save_compressed` writes a directory with
``model.safetensors`` (the adapted layers are stored as their low-rank factors only), ``decaylora_compressed.json``
(which modules are compressed, and how to rebuild them) and, for a transformers model, its ``config.json``;
:func:`load_compressed` rebuilds the model from that directory in one call (or from a Hub repository that holds one:
upload the directory with ``huggingface_hub.upload_folder``).

Every module in a compressed model is described by a JSON *spec* (:func:`module_spec`) and rebuilt from it
(:func:`module_from_spec`); new module types register a builder in ``SPEC_BUILDERS``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .fused import SlicedUpProjection, slice_ids
from .layer import DecayLoraLayer

__all__ = [
    "COMPRESSED_CONFIG_NAME",
    "COMPRESSED_WEIGHTS_NAME",
    "CompressedLayer",
    "CompressionError",
    "check_compressible",
    "compress_and_unload",
    "compress_layer",
    "compressed_layers",
    "directory_size",
    "load_compressed",
    "module_from_spec",
    "module_spec",
    "save_compressed",
]

COMPRESSED_CONFIG_NAME = "decaylora_compressed.json"
COMPRESSED_WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CompressionError(ValueError):
    """A DecayLoRA layer cannot be compressed yet (its frozen weight still contributes)."""


# --------------------------------------------------------------------------------------------- the module
class CompressedLayer(nn.Module):
    """The rank-``r`` layer a DecayLoRA layer becomes at ``d = 0``: ``x -> up(down(x))``.

    ``down`` is the adapter's ``A`` (``Linear(in, r, bias=False)`` or a ``k x k`` ``Conv2d(in, r, bias=False)``) and
    ``up`` is ``s * B`` with bias ``C`` (``Linear(r, out)`` or a ``1 x 1`` ``Conv2d(r, out)``). Its parameters are
    ``down.weight``, ``up.weight`` and ``up.bias``.

    A fused projection (query/key/value slices in one output, ``fused_layout``) has one rank-``r`` block per adapted
    slice: ``up`` is a block-diagonal ``SlicedUpProjection``. Slices that were not adapted kept their frozen weight;
    they are the rows of ``frozen`` (a ``Linear(in, rows)`` holding those rows of ``W`` and ``b``), added to the
    output at ``frozen_rows``.
    """

    def __init__(
        self,
        down: nn.Module,
        up: nn.Module,
        kind: Optional[str] = None,
        fused_layout: Optional[dict] = None,
        frozen: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.down = down
        self.up = up
        self.kind = kind  # the type of the layer it replaces ("Linear", "Conv1D", "Conv2d"), for the record
        self.fused_layout = fused_layout  # {"sizes", "repeat", "enable"} of a fused projection
        self.frozen = frozen
        if frozen is not None:
            self.register_buffer("frozen_rows", _frozen_rows(fused_layout, up.out_features), persistent=False)

    @property
    def rank(self) -> int:
        return self.up.r if isinstance(self.up, SlicedUpProjection) else self.up.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        if self.frozen is not None:
            y = y.index_add(-1, self.frozen_rows, self.frozen(x))
        return y

    def extra_repr(self) -> str:
        return f"rank={self.rank}" + (f", replaces={self.kind}" if self.kind else "")


def _frozen_rows(layout: dict, out_features: int) -> torch.Tensor:
    """The output rows of the slices of ``layout`` that are not adapted (``enable`` False)."""
    ids = slice_ids(layout, out_features, "fused layout")
    disabled = torch.tensor([not on for on in layout["enable"]])
    return torch.nonzero(disabled[ids]).flatten()


def _decay_report(layer: DecayLoraLayer, adapter_name: str) -> Optional[str]:
    """Why ``layer`` cannot be compressed for ``adapter_name`` yet, or None when it can."""
    d = layer.decay_factor(adapter_name)
    noise = layer.noise_active(adapter_name)
    if d == 0.0 and not noise:
        return None
    cfg = layer.decaylora_config[adapter_name]
    reasons = []
    if d != 0.0:
        reasons.append(f"decay factor d={d:.6g} (must be 0)")
    if noise:
        reasons.append(f"noise mean active (noise={cfg.noise!r}, noise_threshold={cfg.noise_threshold})")
    return f"step {layer.get_step(adapter_name)}: " + ", ".join(reasons)


def check_compressible(layer: DecayLoraLayer, adapter_name: str, name: str = "layer") -> None:
    """Raise :class:`CompressionError` naming ``name`` and its current ``d`` unless the layer is exactly low-rank."""
    if adapter_name not in layer.decaylora_A:
        raise CompressionError(f"{name} has no DecayLoRA adapter {adapter_name!r}.")
    report = _decay_report(layer, adapter_name)
    if report is not None:
        raise CompressionError(f"{name} cannot be compressed: {report}.")


def compress_layer(layer: DecayLoraLayer, adapter_name: str = "default", name: str = "layer") -> CompressedLayer:
    """The low-rank module computing what ``layer`` computes in eval mode for ``adapter_name``.

    The layer must be fully decayed (``d == 0``, no noise mean), else :class:`CompressionError`. The result holds
    copies of ``A`` and ``s * B`` (plus ``C`` as the bias of ``up``) in the base layer's dtype and device, and, for
    a fused projection with slices that were not adapted, those slices' rows of the frozen ``W`` and ``b``;
    ``layer`` is not modified. This is the single place that defines what an adapted layer compresses to.
    """
    check_compressible(layer, adapter_name, name)
    base = layer.get_base_layer()
    dtype, device = base.weight.dtype, base.weight.device
    A, B = layer.decaylora_A[adapter_name], layer.decaylora_B[adapter_name]
    layout = layer.fused_layout.get(adapter_name)
    frozen = None
    with torch.no_grad():
        down = copy.deepcopy(A).to(device=device, dtype=dtype)
        up = copy.deepcopy(B).to(device=device, dtype=dtype)
        up.weight.copy_(B.weight.detach() * layer.scaling[adapter_name])
        up.bias = nn.Parameter(layer.decaylora_C[adapter_name].detach().to(device=device, dtype=dtype).clone())
        if layout is not None and not all(layout["enable"]):
            rows = _frozen_rows(layout, layer.out_features).to(device)
            frozen = nn.Linear(layer.in_features, len(rows), bias=base.bias is not None, device=device, dtype=dtype)
            frozen.weight.copy_(layer.kind.weight(base).detach()[rows])
            if base.bias is not None:
                frozen.bias.copy_(base.bias.detach()[rows])
    kind = layer.kind.__name__.removesuffix("Kind")
    compressed = CompressedLayer(down, up, kind=kind, fused_layout=copy.deepcopy(layout), frozen=frozen)
    compressed.requires_grad_(False)
    compressed.train(layer.training)
    return compressed


# --------------------------------------------------------------------------------------------- the model
def _tuner_of(model: nn.Module):
    """The DecayLoRA tuner (``DecayLoraModel``) of a ``PeftModel`` or the tuner itself."""
    from peft.tuners.tuners_utils import BaseTuner

    # PeftModel.base_model is the tuner; the tuner's own .model is the transformers model.
    tuner = model if isinstance(model, BaseTuner) else getattr(model, "base_model", None)
    if not isinstance(tuner, BaseTuner):
        raise TypeError(
            f"compress_and_unload needs a PeftModel or DecayLoraModel, got {type(model).__name__}. Wrap the model "
            "with `peft.get_peft_model(model, DecayLoraConfig(...))` and train it first."
        )
    return tuner


def compress_and_unload(model: nn.Module, adapter_name: Optional[str] = None, progressbar: bool = False) -> nn.Module:
    """Replace every DecayLoRA layer of ``model`` by its low-rank :class:`CompressedLayer` and unload PEFT.

    ``model`` is a ``PeftModel`` or a ``DecayLoraModel``; ``adapter_name`` defaults to the active adapter. Every
    layer carrying the adapter is checked first: if any still has ``d != 0`` or an active noise mean, a
    :class:`CompressionError` lists them with their ``d`` and nothing is changed. Otherwise the adapted layers are
    replaced, the other PEFT wrappers are unloaded as by ``unload()`` (``modules_to_save`` keep their trained copy),
    and the underlying model is returned. Like ``merge_and_unload``, use the returned model, not the wrapper.
    Outputs equal those of the DecayLoRA model in eval mode.
    """
    tuner = _tuner_of(model)
    if adapter_name is None:
        active = list(tuner.active_adapters)
        if len(active) != 1:
            raise ValueError(f"Several adapters are active ({active}); pass `adapter_name` explicitly.")
        adapter_name = active[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} does not exist; adapters: {list(tuner.peft_config)}.")

    root = tuner.model
    layers = [
        (key, module)
        for key, module in root.named_modules()
        if isinstance(module, DecayLoraLayer) and adapter_name in module.decaylora_A
    ]
    if not layers:
        raise ValueError(f"No layer carries DecayLoRA adapter {adapter_name!r}; nothing to compress.")
    refused = [(key, report) for key, layer in layers if (report := _decay_report(layer, adapter_name)) is not None]
    if refused:
        shown = "; ".join(f"{key} ({report})" for key, report in refused[:5])
        more = f"; and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise CompressionError(
            f"{len(refused)} of {len(layers)} DecayLoRA layers still use their frozen weight, so the model cannot be "
            f"compressed: {shown}{more}. Nothing was changed. Train until the schedule ends (d reaches min_decay=0 "
            "at decay_end, and noise='vanish' stops below noise_threshold), or use merge_and_unload() instead."
        )
    # Build every replacement before touching the model, so a failure leaves it unchanged.
    replacements = [
        (key, compress_layer(layer, adapter_name, name=key))
        for key, layer in tqdm(layers, disable=not progressbar, desc="Compressing")
    ]
    for key, compressed in replacements:
        _set_submodule(root, key, compressed)
    _unload(root)
    tuner._remove_model_hooks()
    return root


def _set_submodule(root: nn.Module, key: str, module: nn.Module) -> None:
    parent_key, _, child = key.rpartition(".")
    setattr(root.get_submodule(parent_key) if parent_key else root, child, module)


def _unload(root: nn.Module) -> None:
    """Replace the remaining PEFT wrappers by what they wrap, as ``unload()`` does.

    Written out rather than calling ``BaseTuner.unload()``: PEFT's ``_replace_module`` copies ``weight`` / ``bias``
    onto the unloaded module, which fails for a ``modules_to_save`` entry without a ``weight`` (e.g. BERT's
    ``pooler``), and is not needed here.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    done: list[str] = []
    for key, module in list(root.named_modules()):
        if not key or any(key.startswith(prefix + ".") for prefix in done):
            continue  # inside a wrapper already replaced
        if hasattr(module, "unload_and_optionally_merge_module"):  # ModulesToSaveWrapper, TrainableTokensWrapper...
            _set_submodule(root, key, module.unload_and_optionally_merge_module(merge=False, safe_merge=False,
                                                                               adapter_names=None))
            done.append(key)
        elif isinstance(module, BaseTunerLayer):  # a layer that does not carry the compressed adapter
            if isinstance(module, DecayLoraLayer):
                module.restore_pretrained_weight()
            _set_submodule(root, key, module.get_base_layer())
            done.append(key)
    if hasattr(root, "peft_config"):
        del root.peft_config


def compressed_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """``{module name: CompressedLayer}`` of a compressed model."""
    return {key: module for key, module in model.named_modules() if isinstance(module, CompressedLayer)}


# --------------------------------------------------------------------------------------------- specs
def _tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _linear_spec(module: nn.Linear) -> dict:
    return {
        "type": "Linear",
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
    }


def _conv2d_spec(module: nn.Conv2d) -> dict:
    return {
        "type": "Conv2d",
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": list(module.kernel_size),
        "stride": list(module.stride),
        "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
        "dilation": list(module.dilation),
        "groups": module.groups,
        "padding_mode": module.padding_mode,
        "bias": module.bias is not None,
    }


def _compressed_spec(module: CompressedLayer) -> dict:
    spec = {"type": "CompressedLayer", "replaces": module.kind, "rank": module.rank}
    if module.fused_layout is not None:
        spec["fused_layout"] = module.fused_layout
    spec["down"] = module_spec(module.down)
    spec["up"] = module_spec(module.up)
    if module.frozen is not None:
        spec["frozen"] = module_spec(module.frozen)
    return spec


def _sliced_up_spec(module: SlicedUpProjection) -> dict:
    # The rows of each slice come from the enclosing CompressedLayer's fused_layout.
    return {"type": "SlicedUpProjection", "r": module.r, "out_features": module.out_features,
            "bias": module.bias is not None}


def module_spec(module: nn.Module) -> dict:
    """A JSON-serialisable description of ``module`` from which :func:`module_from_spec` rebuilds it (empty)."""
    for cls, describe in SPEC_WRITERS:
        if type(module) is cls:
            return describe(module)
    raise TypeError(f"no spec writer for {type(module).__name__}; register one in SPEC_WRITERS / SPEC_BUILDERS.")


def module_from_spec(spec: dict) -> nn.Module:
    """Build an (uninitialised) module from :func:`module_spec`'s description."""
    try:
        build = SPEC_BUILDERS[spec["type"]]
    except KeyError:
        raise ValueError(f"unknown module type {spec.get('type')!r} in spec {spec}") from None
    return build(spec)


def _build_linear(spec: dict) -> nn.Linear:
    return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])


def _build_conv2d(spec: dict) -> nn.Conv2d:
    return nn.Conv2d(
        spec["in_channels"],
        spec["out_channels"],
        kernel_size=_tuple(spec["kernel_size"]),
        stride=_tuple(spec["stride"]),
        padding=_tuple(spec["padding"]),
        dilation=_tuple(spec["dilation"]),
        groups=spec["groups"],
        padding_mode=spec["padding_mode"],
        bias=spec["bias"],
    )


def _build_compressed(spec: dict) -> CompressedLayer:
    layout = spec.get("fused_layout")
    up_spec = spec["up"]
    if up_spec["type"] == "SlicedUpProjection":
        ids = slice_ids(layout, up_spec["out_features"], "fused layout")
        up = SlicedUpProjection(up_spec["r"], ids, layout["enable"], bias=up_spec["bias"])
    else:
        up = module_from_spec(up_spec)
    frozen = module_from_spec(spec["frozen"]) if spec.get("frozen") else None
    return CompressedLayer(module_from_spec(spec["down"]), up, kind=spec.get("replaces"), fused_layout=layout,
                           frozen=frozen)


# Exact-type writers (a subclass of Linear may add behaviour a plain Linear would lose) and builders by name.
SPEC_WRITERS: list[tuple[type, Callable[[nn.Module], dict]]] = [
    (CompressedLayer, _compressed_spec),
    (SlicedUpProjection, _sliced_up_spec),
    (nn.Linear, _linear_spec),
    (nn.Conv2d, _conv2d_spec),
]
SPEC_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {
    "CompressedLayer": _build_compressed,
    "Linear": _build_linear,
    "Conv2d": _build_conv2d,
}


# --------------------------------------------------------------------------------------------- save / load
def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _model_dtype(model: nn.Module) -> Optional[str]:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def directory_size(directory: Union[str, os.PathLike]) -> int:
    """Total size in bytes of the files under ``directory``."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def save_compressed(model: nn.Module, directory: Union[str, os.PathLike], tokenizer: Any = None) -> Path:
    """Write a compressed model (the result of :func:`compress_and_unload`) to ``directory``.

    Files: ``model.safetensors`` (the whole state dict; compressed layers as ``<name>.down.weight``,
    ``<name>.up.weight``, ``<name>.up.bias`` only, shared tensors stored once), ``decaylora_compressed.json`` (each
    compressed module's spec: kind, rank, shapes) and, for a transformers model, ``config.json``. With
    ``tokenizer`` (anything with ``save_pretrained``, e.g. a tokenizer or processor) it is saved there too. Returns
    the directory. Publish it with ``huggingface_hub.upload_folder(repo_id=..., folder_path=directory)``.
    """
    from safetensors.torch import save_model

    if any(isinstance(m, DecayLoraLayer) for m in model.modules()):
        raise TypeError(
            "save_compressed got a model that still has DecayLoRA layers; call `model = "
            "peft_model.compress_and_unload()` first and save the model it returns."
        )
    layers = compressed_layers(model)
    if not layers:
        raise ValueError("the model has no compressed layers; did you pass the result of compress_and_unload()?")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from . import __version__

    transformers_model = _is_transformers_model(model)
    manifest = {
        "format_version": FORMAT_VERSION,
        "library": "peft_decaylora",
        "library_version": __version__,
        "transformers_class": type(model).__name__ if transformers_model else None,
        "model_class": f"{type(model).__module__}:{type(model).__qualname__}",
        "dtype": _model_dtype(model),
        "compressed_modules": {key: module_spec(module) for key, module in layers.items()},
    }
    if transformers_model:
        model.config.save_pretrained(directory)
    save_model(model, str(directory / COMPRESSED_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / COMPRESSED_CONFIG_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _resolve_directory(path: Union[str, os.PathLike], **hub_kwargs) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    if isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=path, **hub_kwargs))
    raise FileNotFoundError(f"{path} is neither a directory nor a Hub repository id.")


def _build_transformers_model(directory: Path, class_name: str, dtype: Optional[torch.dtype]) -> nn.Module:
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise ValueError(f"transformers has no class {class_name!r} (saved by another transformers version?).")
    config = transformers.AutoConfig.from_pretrained(directory)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # every weight is loaded from the file
        model = cls._from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    # from_pretrained ties the embeddings after loading; a model built from its config is tied here.
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def load_compressed(
    path: Union[str, os.PathLike], model: Optional[nn.Module] = None, device: Union[str, torch.device] = "cpu",
    **hub_kwargs,
) -> nn.Module:
    """Rebuild a model written by :func:`save_compressed`, in eval mode.

    ``path`` is the directory, or a Hub repository id holding one (downloaded with
    ``huggingface_hub.snapshot_download(**hub_kwargs)``). A transformers model is rebuilt from ``config.json``; any
    other model needs ``model``, a fresh instance of the *uncompressed* architecture (its weights are overwritten).
    The listed modules are replaced by empty :class:`CompressedLayer` s, then every weight is loaded (strictly).
    """
    from safetensors.torch import load_model

    directory = _resolve_directory(path, **hub_kwargs)
    manifest_path = directory / COMPRESSED_CONFIG_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: {path} was not written by save_compressed().")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} has format version {manifest['format_version']}; this peft_decaylora reads up to "
            f"{FORMAT_VERSION}. Upgrade peft_decaylora."
        )
    dtype = getattr(torch, manifest["dtype"]) if manifest.get("dtype") else None
    if model is None:
        if not manifest.get("transformers_class"):
            raise ValueError(
                f"{path} holds a {manifest['model_class']} (not a transformers model): pass a fresh instance of the "
                "uncompressed architecture as `model=`, e.g. `load_compressed(path, model=MyNet())`."
            )
        model = _build_transformers_model(directory, manifest["transformers_class"], dtype)
    for key, spec in manifest["compressed_modules"].items():
        parent_key, _, child = key.rpartition(".")
        parent = model.get_submodule(parent_key) if parent_key else model
        if not hasattr(parent, child):
            raise ValueError(f"the model has no module {key!r} to replace; is it the architecture that was saved?")
        setattr(parent, child, module_from_spec(spec))
    if dtype is not None:
        model.to(dtype)
    load_model(model, str(directory / COMPRESSED_WEIGHTS_NAME), strict=True, device=str(device))
    model.to(device)
    model.requires_grad_(False)
    return model.eval()
