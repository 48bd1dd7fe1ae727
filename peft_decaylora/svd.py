"""The SVD initialisation (docs/method.md, "SVD initialisation"): ``s B0 A`` (saved as ``A``, ``B0``) starts as ``W``'s
top-``r`` part, or the best rank-``r`` fit of ``W x`` on calibration data, and takes over as ``W`` fades."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .distillation import eval_mode
from .layer import DecayLoraLayer
from .sharding import check_not_partitioned, whole, write_whole


@torch.no_grad()
def split_top(layer: DecayLoraLayer, adapter_name: str, input_gram: Optional[torch.Tensor] = None) -> None:
    """Set ``A`` and ``B0`` so that ``s B0 A`` is the top-``r`` SVD part of ``W`` (of each adapted slice, for a fused
    layout), and ``B = 0``. With ``input_gram`` (``E[x x^T]`` of the layer's inputs, ``G = L L^T``) it is the rank-``r``
    fit of ``W x`` on those inputs instead: the SVD of ``W L``, mapped back by ``L^-1`` (activation-aware SVD)."""
    weight = whole(layer.kind.weight(layer.get_base_layer())).detach()  # one layer's, under FSDP2
    rows = weight.float().reshape(weight.shape[0], -1)
    if input_gram is not None:
        # G = V diag(e) V^T, L = V diag(sqrt e), e floored: too few tokens or rounding make G singular or indefinite
        eigenvalues, vectors = torch.linalg.eigh(input_gram.to(device=rows.device, dtype=torch.float64))
        spread = eigenvalues.clamp(min=1e-6 * eigenvalues.clamp(min=0).mean()).sqrt()
        whitening, unwhitening = (vectors * spread).to(rows), (vectors / spread).T.to(rows)
    A, B0 = whole(layer.decaylora_A[adapter_name]).clone(), torch.zeros_like(whole(layer.decaylora_B0[adapter_name]))
    B_rows = B0.view(B0.shape[0], -1)  # a Conv2d B is (out, r, 1, 1)
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    layout = layer.fused_layout.get(adapter_name)
    if layout is None:
        blocks = [(torch.arange(rows.shape[0]), slice(None))]
    else:  # each adapted slice: its output rows and its rows of B
        starts = [sum(layout.slice_sizes[:i]) for i in range(len(layout.slice_sizes))]
        blocks = [(out_rows, slice(start, start + len(out_rows)))
                  for out_rows, start in zip(layout.rows.split(layout.slice_sizes), starts)]
    for index, (output_rows, b_rows) in enumerate(blocks):
        block = rows[output_rows] if input_gram is None else rows[output_rows] @ whitening
        U, S, Vh = torch.linalg.svd(block, full_matrices=False)
        k = min(r, S.numel())  # ranks above the block's rank keep their random A rows and zero B columns
        root = (S[:k] / scaling).sqrt()
        right = Vh[:k] if input_gram is None else Vh[:k] @ unwhitening
        A[index * r: index * r + k] = (root[:, None] * right).reshape((k,) + A.shape[1:]).to(A.dtype)
        B_rows[b_rows, :k] = (U[:, :k] * root).to(B0.dtype)
    write_whole(layer.decaylora_A[adapter_name], A)
    write_whole(layer.decaylora_B0[adapter_name], B0)
    layer.decaylora_B[adapter_name].zero_()


def _run_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**{key: value for key, value in batch.items() if key != "labels"})
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def initialize_from_activations(model: nn.Module, batches: Iterable[Any],
                                forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
                                adapter_name: str = "default") -> None:
    """Re-initialise an ``init_weights="svd"`` adapter from calibration batches, before training.

    The plain SVD split keeps what is largest in ``W``; this one keeps what is largest in ``W x`` for the inputs the
    model actually sees (the SVD of ``W L`` with ``E[x x^T] = L L^T``, as in ASVD / SVD-LLM), so the part that fades out
    with ``W`` carries less of the layer's function. The model's output does not change. For Linear, Conv1D, Conv2d
    (``x`` its input patches, as the kernel sees them) and fused layers; each keeps an ``in x in`` second-moment matrix
    (``in * kh * kw`` for a convolution) while batches run.

    Args:
        model: The PEFT model (or its tuner) carrying the adapter, at step 0.
        batches: Inputs to run through the model, e.g. a few dozen training batches: mappings (dicts, tokenizer outputs)
            as keyword arguments without ``labels``, tuples and lists as positional arguments, else the input.
        forward_fn: ``forward_fn(model, batch)`` instead of the default call.
        adapter_name: The adapter to re-initialise.
    """
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, DecayLoraLayer) and adapter_name in module.decaylora_B0}
    if not layers:
        raise ValueError(f"No layer carries an adapter {adapter_name!r} initialised with init_weights='svd'; "
                         "activation-aware initialisation refines that SVD split. Create the adapter with "
                         "DecayLoraConfig(init_weights='svd').")
    for name, layer in layers.items():  # check everything before changing anything
        check_not_partitioned(layer.get_base_layer().weight)
        step = layer.decaylora_schedule[adapter_name].step
        if step != 0:
            raise ValueError(f"{name}: activation-aware initialisation needs an adapter that has not started training "
                             f"(step {step}). The model was not changed.")
    grams = {name: [0.0, 0] for name in layers}

    def collect(name):
        def hook(module, args):
            inputs = module.kind.patches(module.get_base_layer(), args[0].detach()).float()
            grams[name][0] = grams[name][0] + inputs.T @ inputs
            grams[name][1] += inputs.shape[0]
        return hook

    handles = [layer.register_forward_pre_hook(collect(name)) for name, layer in layers.items()]
    try:
        with eval_mode(model):
            for batch in batches:
                (forward_fn or _run_batch)(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if any(count == 0 for _, count in grams.values()):
        raise ValueError("The calibration batches reached no adapted layer; pass at least one batch of real inputs.")
    for name, layer in layers.items():
        total, count = grams[name]
        split_top(layer, adapter_name, total / count)
        if layer.decaylora_schedule[adapter_name].config.noise != "off":
            layer.set_noise_statistics(adapter_name)  # the part that fades changed
