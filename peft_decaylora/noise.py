"""The noise ``N ~ Normal((1 - d) m, (1 - d^2) sigma^2)`` that keeps the statistics of the fading frozen weight
(docs/method.md, "Noise"), drawn fresh for every training forward and folded into the frozen product:
``d (W x + b) + N x = x (d W + N)^T + d b``, one product of the frozen size. The noisy weight is drawn again from
its seed in backward instead of being kept, so training holds no more memory than LoRA."""

from __future__ import annotations

import functools
import hashlib
from typing import Optional

import torch


def weight_statistics(weight: torch.Tensor, mode: str, slice_ids: Optional[torch.Tensor] = None):
    """Mean and standard deviation of ``weight`` (canonical ``(out, ...)``) for every output row: pooled over the
    whole tensor or over each slice (``mode="tensor"``, ``slice_ids`` giving each row's slice), or per row."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    if mode == "channel":
        return rows.mean(dim=1), rows.std(dim=1, unbiased=False)
    ids = (torch.zeros(rows.shape[0], dtype=torch.long) if slice_ids is None else slice_ids).to(rows.device)
    mean, std = torch.empty(rows.shape[0], device=rows.device), torch.empty(rows.shape[0], device=rows.device)
    for slice_id in ids.unique():
        in_slice = ids == slice_id
        mean[in_slice], std[in_slice] = rows[in_slice].mean(), rows[in_slice].std(unbiased=False)
    return mean, std


def mixed_seed(*parts) -> int:
    """A 63-bit seed mixed from the parts (the config seed, the layer, the step and the forward within the step)."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class NoiseDraws:
    """The seeds of one layer's noise for one adapter: a function of ``noise_seed``, the layer, the optimizer step and
    the forward within that step, so a resumed run and every data-parallel rank draw the same noise."""

    def __init__(self, noise_seed: int, layer_key: str) -> None:
        self.noise_seed, self.layer_key = noise_seed, layer_key
        self.moves, self.forward_index, self.recomputed_in = None, -1, None
        self.generators: dict[torch.device, torch.Generator] = {}

    def next_seed(self, schedule) -> int:
        """The seed of this forward's draw. A recomputation in backward (gradient checkpointing) replays the latest
        forward's seed, which is right only when that is the forward it recomputes: once per backward."""
        backward = torch._C._current_graph_task_id()
        if backward == -1:  # a forward: the next draw at this schedule position
            if self.moves != schedule.moves:
                self.moves, self.forward_index = schedule.moves, -1
            self.forward_index += 1
        elif self.recomputed_in != backward:
            self.recomputed_in = backward
        else:
            raise RuntimeError(f"DecayLoRA layer {self.layer_key!r}: gradient checkpointing recomputed its noisy "
                               "forward twice in one backward pass. The noise is drawn anew for every forward and a "
                               "recomputation can replay only the latest, so the gradients of the earlier forwards "
                               "would be wrong. This happens when several forwards (or several calls of a shared "
                               "layer) feed one backward: call backward after each forward, disable gradient "
                               "checkpointing, or train with noise='off' (the default).")
        return mixed_seed(self.noise_seed, self.layer_key, schedule.step, self.forward_index)

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device)
        return self.generators[device]


def noisy_weight(weight, decay, mean, std, generator: torch.Generator, seed: int) -> torch.Tensor:
    """``decay W + N(mean, std)``, the noise drawn from ``seed`` (``decay``: a float or per-row; statistics per row)."""
    generator.manual_seed(seed)
    noise = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
    drawn = torch.addcmul(mean, noise, std)  # with the draw and the decayed W: three passes over W
    return drawn.addcmul_(weight, decay) if torch.is_tensor(decay) else drawn.add_(weight, alpha=decay)


class RedrawnWeightProduct(torch.autograd.Function):
    """``kind.apply(base, x, make_weight(), bias)`` that calls ``make_weight`` again in backward instead of keeping
    the weight. Only the input gets a gradient: weight and bias are frozen."""

    @staticmethod
    def forward(ctx, x, bias, kind, base, make_weight):
        ctx.kind, ctx.base, ctx.make_weight, ctx.input_shape = kind, base, make_weight, x.shape
        return kind.apply(base, x, make_weight(), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_input = None
        if ctx.needs_input_grad[0]:
            weight = ctx.make_weight().to(grad.dtype)
            grad_input = ctx.kind.input_gradient(ctx.base, grad, weight, ctx.input_shape)
        return grad_input, None, None, None, None


def noisy_frozen_product(kind, base, x, decay, mean, std, draws: Optional[NoiseDraws], schedule) -> torch.Tensor:
    """``x (d W + N)^T + d b``: with ``draws`` a fresh draw (training), else the expectation ``d W + mean``.
    ``decay`` is a float or one value per output row, ``mean`` and ``std`` one value per output row."""
    weight = kind.weight(base).detach()
    bias = None if base.bias is None else base.bias * decay
    column = (-1,) + (1,) * (weight.dim() - 1)
    decay, mean, std = (v.to(weight.dtype).view(column) if torch.is_tensor(v) else v for v in (decay, mean, std))
    if draws is None:
        return kind.apply(base, x, weight * decay + mean, bias)
    make_weight = functools.partial(noisy_weight, weight, decay, mean, std, draws.generator(weight.device),
                                    draws.next_seed(schedule))
    return RedrawnWeightProduct.apply(x, bias, kind, base, make_weight)
