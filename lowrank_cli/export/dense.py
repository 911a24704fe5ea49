"""Merging factorized layers back to dense ones: `W = up · down` (in fp32 at least)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from lowrank_cli.io.manifest import LayerEntry
from lowrank_cli.nn.lowrank import LowRankEmbedding, LowRankLinear
from lowrank_cli.nn.surgery import replace_modules


def merge_state_dict(tensors: dict[str, torch.Tensor], layers: Mapping[str, LayerEntry],
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Each factorized layer's pair becomes its dense tensors again, as the original module stores them:
    `<layer>.weight = up · down` (transposed for GPT-2's Conv1D) and `<layer>.bias`; an embedding's
    `lookup · projᵀ`. Products in fp32, rounded once to `dtype` (the export's) or else the factors' own:
    an fp32 export of bf16 factors keeps the product in fp32 instead of rounding it to bf16 first. Works on
    the state dict alone, so weight-only checkpoints merge too; key order is kept.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        layer, _, leaf = key.rpartition(".")
        parent, _, half = layer.rpartition(".")
        entry = layers.get(parent)
        if entry is None or half not in ("down", "up", "lookup", "proj"):
            out[key] = value
        elif half == "down" and leaf == "weight":
            w = tensors[f"{parent}.up.weight"].float() @ value.float()
            out[f"{parent}.weight"] = (w.T.contiguous() if entry.kind == "conv1d" else w).to(dtype or value.dtype)
            if f"{parent}.up.bias" in tensors:
                out[f"{parent}.bias"] = tensors[f"{parent}.up.bias"]
        elif half == "lookup" and leaf == "weight":
            out[f"{parent}.weight"] = (value.float() @ tensors[f"{parent}.proj.weight"].float().T).to(dtype or value.dtype)
    return out


def merge_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every `LowRankLinear` (`LowRankEmbedding`) by its merged dense `nn.Linear` (`nn.Embedding`); returns the model."""
    replace_modules(model, lambda _name, m: m.merge(), lambda _name, m: isinstance(m, (LowRankLinear, LowRankEmbedding)))
    return model
