"""Fused projections: one layer whose output concatenates query, key and value slices.

A *layout* says which output rows belong to which slice: ``{"sizes": [q, k, v], "repeat": n}`` is the pattern of
slice sizes repeated ``n`` times along the output (``repeat`` defaults to 1, and a plain list means the same with
``repeat=1``). GPT-2 ``c_attn`` and Phi-3 ``qkv_proj`` are contiguous (``[q, k, v]``), GPT-NeoX ``query_key_value``
interleaves the slices per head (``{"sizes": [h, h, h], "repeat": heads}``), Falcon per key/value group.

Each adapted slice gets its own rank-r adapter (loralib's ``MergedLinear``); slices that are not adapted keep their
frozen weight, undecayed and without noise, at every step, including after compression.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

Layout = Union[list, dict]


def normalize_layout(layout: Layout, where: str) -> dict:
    """``{"sizes": [...], "repeat": n}`` from either accepted form; raises ``ValueError`` naming ``where``."""
    if isinstance(layout, (list, tuple)):
        layout = {"sizes": list(layout), "repeat": 1}
    if not isinstance(layout, dict) or set(layout) - {"sizes", "repeat"} or "sizes" not in layout:
        raise ValueError(
            f"{where}: a fused layout is a list of slice sizes or {{'sizes': [...], 'repeat': n}}, got {layout!r}."
        )
    sizes, repeat = list(layout["sizes"]), layout.get("repeat", 1)
    if len(sizes) < 2 or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sizes):
        raise ValueError(f"{where}: fused slice sizes must be two or more positive integers, got {sizes!r}.")
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat <= 0:
        raise ValueError(f"{where}: fused layout 'repeat' must be a positive integer, got {repeat!r}.")
    return {"sizes": sizes, "repeat": repeat}


def slice_ids(layout: dict, out_features: int, where: str) -> torch.Tensor:
    """The slice index of every output row."""
    pattern = torch.cat([torch.full((size,), i) for i, size in enumerate(layout["sizes"])])
    ids = pattern.repeat(layout["repeat"])
    if ids.numel() != out_features:
        raise ValueError(
            f"{where}: fused layout {layout} covers {ids.numel()} output features, but the layer has {out_features}."
        )
    return ids


def detect_fused_layouts(model_config: dict) -> dict[str, dict]:
    """Layouts of the fused QKV projections of common transformers architectures, from their model config."""
    model_type = model_config.get("model_type")
    if model_type == "gpt2":
        hidden = model_config["n_embd"]
        return {"c_attn": {"sizes": [hidden] * 3, "repeat": 1}}
    heads = model_config.get("num_attention_heads")
    hidden = model_config.get("hidden_size")
    if not heads or not hidden:
        return {}
    head_dim = model_config.get("head_dim") or hidden // heads
    if model_type == "phi3":
        kv_heads = model_config.get("num_key_value_heads") or heads
        return {"qkv_proj": {"sizes": [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], "repeat": 1}}
    if model_type == "gpt_neox":
        return {"query_key_value": {"sizes": [head_dim] * 3, "repeat": heads}}
    if model_type == "falcon":
        if model_config.get("new_decoder_architecture"):
            kv_heads = model_config.get("num_kv_heads") or heads
            group = heads // kv_heads * head_dim
            return {"query_key_value": {"sizes": [group, head_dim, head_dim], "repeat": kv_heads}}
        if model_config.get("multi_query"):
            return {"query_key_value": {"sizes": [heads * head_dim, head_dim, head_dim], "repeat": 1}}
        return {"query_key_value": {"sizes": [head_dim] * 3, "repeat": heads}}
    return {}


class SlicedUpProjection(nn.Module):
    """``B`` of a fused projection: adapted slice ``i`` maps its own ``r`` columns of ``A x`` to its own rows.

    Rows of slices that are not adapted receive 0. ``weight`` stacks the per-slice ``B_i`` (rows in output order).
    """

    def __init__(self, r: int, ids: torch.Tensor, enabled: list[bool], bias: bool = False) -> None:
        super().__init__()
        self.r = r
        self.out_features = ids.numel()
        rows = [torch.nonzero(ids == i).flatten() for i, on in enumerate(enabled) if on]
        self.slice_sizes = [len(row) for row in rows]
        self.register_buffer("rows", torch.cat(rows), persistent=False)
        self.covers_all_rows = bool(torch.equal(self.rows, torch.arange(self.out_features)))
        self.weight = nn.Parameter(torch.zeros(sum(self.slice_sizes), r))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, h: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``B h`` plus ``bias`` (or the module's own bias when None)."""
        parts = [
            F.linear(h_i, w_i) for h_i, w_i in zip(h.split(self.r, dim=-1), self.weight.split(self.slice_sizes))
        ]
        y = torch.cat(parts, dim=-1)
        if not self.covers_all_rows:
            y = y.new_zeros(*y.shape[:-1], self.out_features).index_copy(-1, self.rows, y)
        bias = self.bias if bias is None else bias
        return y if bias is None else y + bias

    def dense_product(self, A_weight: torch.Tensor) -> torch.Tensor:
        """The ``(out, in)`` weight of ``self(A(.))`` (zero rows for slices that are not adapted)."""
        blocks = [
            w_i @ a_i for w_i, a_i in zip(self.weight.split(self.slice_sizes), A_weight.split(self.r))
        ]
        dense = A_weight.new_zeros(self.out_features, A_weight.shape[1])
        return dense.index_copy(0, self.rows, torch.cat(blocks))

    def extra_repr(self) -> str:
        return f"r={self.r}, slice_sizes={self.slice_sizes}, out_features={self.out_features}"


def adapted_row_mask(ids: torch.Tensor, enabled: list[bool]) -> Optional[torch.Tensor]:
    """1.0 for rows of adapted slices, 0.0 for the others; None when every slice is adapted."""
    if all(enabled):
        return None
    return torch.tensor(enabled, dtype=torch.float32)[ids]
