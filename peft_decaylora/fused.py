"""Fused projections: one layer whose output concatenates query, key and value slices (GPT-2 ``c_attn`` and Phi-3
``qkv_proj`` contiguously, GPT-NeoX ``query_key_value`` interleaved per head, Falcon per key/value group). A layout
``{"sizes": [q, k, v], "repeat": n}`` repeats that pattern of slice sizes ``n`` times along the output (a plain list
means ``repeat=1``). Each adapted slice gets its own rank-r adapter (loralib's ``MergedLinear``); slices left out with
``fused_enable`` keep their frozen weight, undecayed and without noise, at every step and after compression."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FusedLayout:
    """The slices of a fused layer's output rows, and which are adapted (each with its own rank-``r`` block of A, B)."""

    def __init__(self, layout, out_features: int, enable: Optional[Sequence[bool]] = None, where: str = ""):
        layout = normalize_layout(layout, where)
        self.sizes, self.repeat = layout["sizes"], layout["repeat"]
        self.enable = [True] * len(self.sizes) if enable is None else list(enable)
        if len(self.enable) != len(self.sizes) or not any(self.enable):
            raise ValueError(f"{where}: `fused_enable` needs one True/False per slice of {layout} with at least one "
                             f"True, got {enable!r}.")
        self.slice_ids = torch.cat([torch.full((size,), i) for i, size in enumerate(self.sizes)]).repeat(self.repeat)
        if self.slice_ids.numel() != out_features:
            raise ValueError(f"{where}: fused layout {layout} covers {self.slice_ids.numel()} output features, but the "
                             f"layer has {out_features}.")
        rows = [torch.nonzero(self.slice_ids == i).flatten() for i, on in enumerate(self.enable) if on]
        self.slice_sizes = [len(row) for row in rows]  # rows of each adapted slice
        self.rows = torch.cat(rows)  # the output rows of the adapted slices, slice by slice
        self.frozen_rows = torch.nonzero(~torch.tensor(self.enable)[self.slice_ids]).flatten()
        self.out_features = out_features
        self.in_order = torch.equal(self.rows, torch.arange(out_features))  # contiguous slices, all adapted
        # 1.0 for the rows of adapted slices, 0.0 for the others; None when every slice is adapted
        self.row_mask = None if all(self.enable) else torch.tensor(self.enable, dtype=torch.float32)[self.slice_ids]
        self._on_device = {}

    def to_dict(self) -> dict:
        return {"sizes": self.sizes, "repeat": self.repeat, "enable": self.enable}

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """``self.<name>`` (a tensor of this layout) on ``device``, copied there once."""
        if (name, device) not in self._on_device:
            self._on_device[name, device] = getattr(self, name).to(device)
        return self._on_device[name, device]

    def row_decay(self, d: float, device: torch.device):
        """``d`` for the rows of adapted slices and 1 for the others; just ``d`` when every slice is adapted."""
        return d if self.row_mask is None else 1.0 - self.on("row_mask", device) * (1.0 - d)

    def up(self, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``B h + bias``: adapted slice ``i`` maps its own ``r`` columns of ``h`` to its own rows; the others get 0."""
        r = weight.shape[1]
        parts = [F.linear(h_i, w_i) for h_i, w_i in zip(h.split(r, dim=-1), weight.split(self.slice_sizes))]
        y = torch.cat(parts, dim=-1)
        if not self.in_order:
            y = y.new_zeros(*y.shape[:-1], self.out_features).index_copy(-1, self.on("rows", h.device), y)
        return y if bias is None else y + bias

    def product(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The ``(out, in)`` weight of ``up(A x)`` (zero rows for slices that are not adapted)."""
        blocks = [b_i @ a_i for b_i, a_i in zip(B.split(self.slice_sizes), A.split(B.shape[1]))]
        return A.new_zeros(self.out_features, A.shape[1]).index_copy(0, self.on("rows", A.device), torch.cat(blocks))


class SlicedUpProjection(nn.Module):
    """The ``up`` of a compressed fused layer: ``FusedLayout.up`` with its weight and bias as parameters."""

    def __init__(self, layout: FusedLayout, r: int, bias: bool = True) -> None:
        super().__init__()
        self.layout, self.r, self.out_features = layout, r, layout.out_features
        self.weight = nn.Parameter(torch.zeros(sum(layout.slice_sizes), r))
        self.bias = nn.Parameter(torch.zeros(layout.out_features)) if bias else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layout.up(h, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"r={self.r}, slice_sizes={self.layout.slice_sizes}, out_features={self.out_features}"


def normalize_layout(layout, where: str) -> dict:
    """``{"sizes": [...], "repeat": n}`` from either accepted form; raises ``ValueError`` naming ``where``."""
    if isinstance(layout, (list, tuple)):
        layout = {"sizes": list(layout), "repeat": 1}
    if not isinstance(layout, dict) or set(layout) - {"sizes", "repeat", "enable"} or "sizes" not in layout:
        raise ValueError(f"{where}: a fused layout is a list of slice sizes or {{'sizes': [...], 'repeat': n}}, got "
                         f"{layout!r}.")
    sizes, repeat = list(layout["sizes"]), layout.get("repeat", 1)
    if len(sizes) < 2 or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sizes):
        raise ValueError(f"{where}: fused slice sizes must be two or more positive integers, got {sizes!r}.")
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat <= 0:
        raise ValueError(f"{where}: fused layout 'repeat' must be a positive integer, got {repeat!r}.")
    return {"sizes": sizes, "repeat": repeat}


def detect_fused_layouts(model_config: dict) -> dict[str, dict]:
    """Layouts of the fused QKV projections of common transformers architectures, from their model config."""
    model_type = model_config.get("model_type")
    if model_type == "gpt2":
        return {"c_attn": {"sizes": [model_config["n_embd"]] * 3, "repeat": 1}}
    heads, hidden = model_config.get("num_attention_heads"), model_config.get("hidden_size")
    if not heads or not hidden:
        return {}
    head_dim = model_config.get("head_dim") or hidden // heads
    if model_type == "phi3":
        kv_heads = model_config.get("num_key_value_heads") or heads
        return {"qkv_proj": {"sizes": [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], "repeat": 1}}
    if model_type == "falcon" and model_config.get("new_decoder_architecture"):
        groups = model_config.get("num_kv_heads") or heads  # one key and one value per group of query heads
        return {"query_key_value": {"sizes": [heads // groups * head_dim, head_dim, head_dim], "repeat": groups}}
    if model_type == "falcon" and model_config.get("multi_query"):
        return {"query_key_value": {"sizes": [heads * head_dim, head_dim, head_dim], "repeat": 1}}
    if model_type in ("gpt_neox", "falcon"):  # interleaved per head
        return {"query_key_value": {"sizes": [head_dim] * 3, "repeat": heads}}
    return {}
