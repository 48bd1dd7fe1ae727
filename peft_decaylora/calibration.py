"""Activation-aware initialisation: fit each adapter's starting ``s B A`` to the layer's outputs on real inputs.

With ``init_weights="svd"`` the adapter starts at the top-``r`` SVD part of ``W`` and the residual decays away. The
plain SVD keeps what is largest in ``W``; ``initialize_from_activations`` keeps what is largest in ``W x`` for the
inputs the model actually sees (the SVD of ``W L`` with ``E[x x^T] = L L^T``, as in ASVD / SVD-LLM), so the part
that decays carries less of the layer's function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .layer import Conv2dKind, DecayLoraLayer
from .model import eval_mode


def _run_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**{key: value for key, value in batch.items() if key != "labels"})
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def initialize_from_activations(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    adapter_name: str = "default",
) -> None:
    """Re-initialise an ``init_weights="svd"`` adapter from calibration batches, before training.

    Args:
        model: The PEFT model (or its tuner) carrying the adapter, at step 0.
        batches: Inputs to run through the model, e.g. a few dozen training batches. Mappings (dicts, tokenizer
            outputs) are passed as keyword arguments (``labels`` dropped), tuples and lists as positional
            arguments, anything else as the input.
        forward_fn: ``forward_fn(model, batch)`` instead of the default call.
        adapter_name: The adapter to re-initialise.

    The model's output is unchanged (``W`` is still split exactly into top part and residual); what changes is which
    part decays. Supported for Linear, Conv1D and fused layers; each layer keeps an ``in x in`` second-moment matrix
    while the batches run. The fitted split is saved with the adapter (its top part, as many values as ``A`` and
    ``B``), since loading cannot derive it from ``W`` as it does the plain SVD split.
    """
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, DecayLoraLayer) and adapter_name in module.decaylora_top_left}
    if not layers:
        raise ValueError(
            f"No layer carries an adapter {adapter_name!r} initialised with init_weights='svd'; activation-aware "
            "initialisation refines that SVD split. Create the adapter with DecayLoraConfig(init_weights='svd')."
        )
    for name, layer in layers.items():  # check everything before changing anything
        if layer.kind is Conv2dKind or layer.get_step(adapter_name) != 0:
            raise ValueError(
                f"{name}: activation-aware initialisation needs a linear layer (Linear, Conv1D, fused) whose adapter "
                f"has not started training (step {layer.get_step(adapter_name)}). The model was not changed."
            )
    grams = {name: [0.0, 0] for name in layers}

    def collect(name):
        def hook(module, args):
            inputs = args[0].detach().reshape(-1, module.in_features).float()
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
        layer.resplit_top(adapter_name, total / count)
