"""Merging factorized layers back to dense ones: `W = up · down` (in fp32 at least)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lowrank_cli.nn.lowrank import LowRankLinear
from lowrank_cli.nn.surgery import replace_modules


def merge_state_dict(tensors: dict[str, torch.Tensor], layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """Each factorized `<layer>.down/up` pair of `layers` becomes `<layer>.weight = up · down` (fp32 product) and `<layer>.bias`.

    Works on the state dict alone, so weight-only checkpoints merge too; key order is kept.
    """
    layers = set(layers)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        layer, _, leaf = key.rpartition(".")
        parent, _, half = layer.rpartition(".")
        if parent in layers and half == "down" and leaf == "weight":
            up = tensors[f"{parent}.up.weight"]
            out[f"{parent}.weight"] = (up.float() @ value.float()).to(value.dtype)
            if f"{parent}.up.bias" in tensors:
                out[f"{parent}.bias"] = tensors[f"{parent}.up.bias"]
        elif parent in layers and half in ("down", "up"):
            continue  # folded into <parent>.weight / .bias above
        else:
            out[key] = value
    return out


def merge_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every `LowRankLinear` by its merged dense `nn.Linear`; returns the model."""
    replace_modules(model, lambda _name, m: m.merge(), lambda _name, m: isinstance(m, LowRankLinear))
    return model
