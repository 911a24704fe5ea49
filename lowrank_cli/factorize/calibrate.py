"""The per-layer input statistics that data-aware factorization needs.

`collect_input_stats` streams calibration batches (`data.calibration_batches`) through
the model with forward pre-hooks on the selected linears and accumulates each layer's
input Gram matrix `X Xᵀ` (d_in × d_in, fp64; products in fp32 on the model's device) and
its mean |x| per input feature (for ASVD).

Memory: the Grams of all selected layers are held during one calibration pass when they
fit under `max_gram_bytes` (default 2 GiB); otherwise the layers are split into groups and
the calibration data is run once per group. Holding them all is the right default: the
calibration forward passes, not the Grams, dominate the cost, and `deit_base_patch16_224`'s
48 Grams take 1.08 GB in fp64 (12 × (3·768² + 3072²) × 8 B), while one layer at a time
would mean 48 passes over the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.models.family import Inputs, batch_size, call_model, inputs_to
from lowrank_cli.nn.lowrank import linear_dims


@dataclass
class LayerInputStats:
    """Statistics of one linear layer's inputs over the calibration set (rows = tokens × images)."""

    gram: torch.Tensor | None  # Σ x xᵀ over rows, d_in × d_in, fp64
    abs_sum: torch.Tensor  # Σ |x| over rows, d_in, fp64
    rows: int = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


def _batches_of(calibration: Iterable) -> Iterator[Inputs]:
    for batch in calibration:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch  # (inputs, labels) loaders too


@torch.no_grad()
def collect_input_stats(model: nn.Module, names: list[str], calibration: Iterable, gram: bool = True,
                        call: Callable[[nn.Module, Inputs], Any] = call_model) -> dict[str, LayerInputStats]:
    """One pass of `calibration` (input batches, or (inputs, labels) pairs) through `model`,
    accumulating the input statistics of the `nn.Linear`s called `names`.

    The model runs in eval mode; its weights are not changed. Hooks are removed afterwards.
    """
    param = next(model.parameters())
    stats: dict[str, LayerInputStats] = {}
    current: dict[str, torch.Tensor | None] = {}  # the batch's attention mask, for the hooks
    hooks = []
    for name in names:
        layer = model.get_submodule(name)
        d_in = linear_dims(layer)[0]
        st = stats[name] = LayerInputStats(
            torch.zeros(d_in, d_in, dtype=torch.float64, device=param.device) if gram else None,
            torch.zeros(d_in, dtype=torch.float64, device=param.device),
        )

        def hook(_mod, args, st=st):
            x = args[0].detach()
            mask = current.get("mask")
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.bool()]  # text: the real tokens only, not the padding
            x = x.reshape(-1, x.shape[-1]).float()
            if st.gram is not None:
                st.gram += (x.T @ x).double()  # fp32 product per batch, fp64 sum over batches
            st.abs_sum += x.abs().sum(0).double()
            st.rows += x.shape[0]

        hooks.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for inputs in _batches_of(calibration):
            inputs = inputs_to(inputs, param.device, param.dtype)
            current["mask"] = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            call(model, inputs)
            seen += batch_size(inputs)
        if seen == 0:
            raise LowrankError("calibration data is empty: give at least one example (factorize.calib_samples)", param="calib_samples")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats


def gram_groups(model: nn.Module, names: list[str], max_gram_bytes: int) -> list[list[str]]:
    """Split `names` into consecutive groups whose fp64 Grams fit in `max_gram_bytes` (one layer at least)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        d_in = linear_dims(model.get_submodule(name))[0]
        need = d_in * d_in * 8
        if groups[-1] and size + need > max_gram_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return [g for g in groups if g]

