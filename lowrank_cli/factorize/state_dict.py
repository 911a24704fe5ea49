"""Weight-only factorization: a checkpoint's 2-D weights factorized from the file alone, no model built."""

from __future__ import annotations

from typing import Callable

import torch

from lowrank_cli.decompose.svd import svd, truncated_factors
from lowrank_cli.plan.select import LayerPlan, rule_of, set_rank

Progress = Callable[[str], None]


def factorize_state_dict(
    tensors: dict[str, torch.Tensor] | Callable[[str], torch.Tensor],
    plans: list[LayerPlan],
    keys: list[str],
    progress: Progress | None = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Weight-only factorization: each planned `<layer>.weight` becomes `<layer>.down/up.weight`.

    `tensors` is a dict or a getter (e.g. `safe_open(...).get_tensor`) so that tensors are
    read one at a time. A layer's bias moves to `<layer>.up.bias`; other keys are copied.
    `plans` with the energy rule get their rank here, from the SVD (on `svd_device(device)`).
    """
    get = tensors.__getitem__ if isinstance(tensors, dict) else tensors
    by_weight = {f"{p.name}.weight": p for p in plans if p.factorized}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in keys:
        if (plan := by_weight.get(key)) is None:
            continue
        w = get(key)
        usv = svd(w, device)
        set_rank(plan, *rule_of(plan), usv[1].cpu())
        if plan.factorized:
            factors[plan.name] = truncated_factors(w, plan.rank, usv)
        del usv, w
        if progress is not None:
            progress(plan.name)
    out: dict[str, torch.Tensor] = {}
    for key in keys:  # the input's key order, with each factorized weight in its place
        layer, _, leaf = key.rpartition(".")
        if layer in factors and leaf == "weight":
            out[f"{layer}.down.weight"], out[f"{layer}.up.weight"] = factors[layer][1], factors[layer][0]
        elif layer in factors and leaf == "bias":
            out[f"{layer}.up.bias"] = get(key)
        else:
            out[key] = get(key)
    return out


