"""`LowRankLinear` and truncated-SVD factorization of models and bare state dicts (PELA §3.1).

`W ≈ up · down` with `down = √Σ_r V_rᵀ` (r × d_in) and `up = U_r √Σ_r` (d_out × r): the
best rank-r approximation of W (Eckart–Young), √Σ split into both factors so that they
have the same scale. The original bias goes on `up`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.recipe import Recipe
from lowrank_cli.select import LayerPlan, linear_candidates, plan_layers, rule_of, set_rank, weight_candidates


class LowRankLinear(nn.Module):
    """`y = up(down(x))`: a rank-`rank` stand-in for an `nn.Linear(in_features, out_features)`.

    Costs `rank·(in_features + out_features)` MACs per token instead of `in·out`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.up.bias is not None}"

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Wrap given factors (`up`: d_out × r, `down`: r × d_in) without copying or random init."""
        rank, d_in = down.shape
        layer = cls(d_in, up.shape[0], rank, bias=bias is not None, device="meta")
        layer.down.weight = nn.Parameter(down)
        layer.up.weight = nn.Parameter(up)
        if bias is not None:
            layer.up.bias = nn.Parameter(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """The best rank-`rank` factorization of `linear` by truncated SVD, in its dtype and device."""
        U, S, Vh = svd(linear.weight)
        up, down = split_factors(U, S, Vh, rank, linear.weight.dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_factors(up.to(linear.weight.device), down.to(linear.weight.device), bias)

    def merge(self) -> nn.Linear:
        """One dense `nn.Linear` with `W = up · down`, computed in fp32 at least."""
        w = self.up.weight.float() @ self.down.weight.float()
        dense = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None, device="meta")
        dense.weight = nn.Parameter(w.to(self.up.weight.dtype))
        if self.up.bias is not None:
            dense.bias = nn.Parameter(self.up.bias.detach().clone())
        return dense


def svd_device() -> torch.device:
    """Where SVDs run: the GPU when there is one."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def svd(weight: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a weight in fp32 (fp64 stays fp64), on `device` (default: `svd_device()`)."""
    w = weight.detach().to(device or svd_device())
    w = w.double() if w.dtype == torch.float64 else w.float()
    return torch.linalg.svd(w, full_matrices=False)


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (U_r √Σ_r, √Σ_r V_rᵀ), moved to the CPU-side caller's dtype."""
    root = S[:rank].sqrt()
    up = (U[:, :rank] * root).to(dtype)
    down = (root[:, None] * Vh[:rank]).to(dtype)
    return up.contiguous(), down.contiguous()


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (dotted path) by `module`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


Progress = Callable[[str], None]


def factorize_model(
    model: nn.Module,
    recipe: Recipe,
    progress: Progress | None = None,
    calibration: Iterable | None = None,
    on_allocation: Callable | None = None,
    latency=None,
) -> list[LayerPlan]:
    """Replace, in place, each `nn.Linear` the recipe selects by a `LowRankLinear` from its SVD.

    One layer at a time: the dense weight is released as soon as its factors exist, so peak
    memory stays near one layer's SVD beyond the model. Returns the plan of every candidate
    (dense ones with their reason). `progress(name)` is called after each layer.
    `factorize.method: whitened | asvd` needs `calibration` (image batches; see
    `whiten.py`); `rank_rule: budget` allocates ranks first and passes the
    `budget.Allocation` to `on_allocation`.
    With `select.latency_aware`, `latency` (a `latency.LatencySelection`, built from the
    model when not given) times each layer once its rank is known and keeps dense those
    not faster factorized; its `to_dict()` then holds the timings.
    """
    plans = plan_layers(linear_candidates(model), recipe)
    if latency is None and recipe.select.latency_aware:
        from lowrank_cli.latency import LatencySelection

        latency = LatencySelection.for_model(model, recipe.select)
    if recipe.factorize.method != "svd":
        from lowrank_cli.whiten import factorize_model_data_aware

        decide = None if latency is None else lambda plan: latency.decide([plan])
        return factorize_model_data_aware(model, recipe, plans, calibration, progress, on_allocation, decide)
    if recipe.factorize.rank_rule == "budget":  # every spectrum first (svdvals), then the usual loop
        from lowrank_cli.budget import allocate_for_model

        alloc = allocate_for_model(model, plans, recipe, lambda n: torch.linalg.svdvals(model.get_submodule(n).weight.detach().to(svd_device()).float()))
        if on_allocation is not None:
            on_allocation(alloc)
    if latency is not None:  # ranks known before the SVD (κ, rank, budget): time them all now, no SVD for dense ones
        for plan in latency.decide(plans):
            if progress is not None:
                progress(plan.name)
    for plan in plans:
        if not plan.factorized:
            continue
        linear = model.get_submodule(plan.name)
        U, S, Vh = svd(linear.weight)
        set_rank(plan, *rule_of(plan), S.cpu())
        if latency is not None and plan.factorized:  # the energy rule's rank is known only now
            latency.decide([plan])
        if plan.factorized:
            up, down = split_factors(U, S, Vh, plan.rank, linear.weight.dtype)
            bias = None if linear.bias is None else linear.bias.detach()
            set_submodule(model, plan.name, LowRankLinear.from_factors(up.to(linear.weight.device), down.to(linear.weight.device), bias))
        del U, S, Vh, linear
        if progress is not None:
            progress(plan.name)
    return plans


def factorize_state_dict(
    tensors: dict[str, torch.Tensor] | Callable[[str], torch.Tensor],
    plans: list[LayerPlan],
    keys: list[str],
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Weight-only factorization: each planned `<layer>.weight` becomes `<layer>.down/up.weight`.

    `tensors` is a dict or a getter (e.g. `safe_open(...).get_tensor`) so that tensors are
    read one at a time. A layer's bias moves to `<layer>.up.bias`; other keys are copied.
    `plans` with the energy rule get their rank here, from the SVD.
    """
    get = tensors.__getitem__ if isinstance(tensors, dict) else tensors
    by_weight = {f"{p.name}.weight": p for p in plans if p.factorized}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in keys:
        if (plan := by_weight.get(key)) is None:
            continue
        w = get(key)
        U, S, Vh = svd(w)
        set_rank(plan, *rule_of(plan), S.cpu())
        if plan.factorized:
            up, down = split_factors(U, S, Vh, plan.rank, w.dtype)
            factors[plan.name] = (up.cpu(), down.cpu())
        del U, S, Vh, w
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


def manifest_layers(plans: list[LayerPlan], method: str = "svd") -> dict[str, dict]:
    """The manifest's per-layer entries: rank, d_in, d_out, bias, rule and method."""
    return {
        p.name: {"rank": p.rank, "d_in": p.d_in, "d_out": p.d_out, "bias": p.bias, "rule": p.rule, "method": method}
        for p in plans
        if p.factorized
    }


def apply_manifest_structure(model: nn.Module, layers: dict[str, dict]) -> nn.Module:
    """Swap in empty `LowRankLinear`s where a manifest says, so a factorized state dict loads strictly."""
    for name, entry in layers.items():
        dense = model.get_submodule(name)
        if not isinstance(dense, nn.Linear) or (dense.in_features, dense.out_features) != (entry["d_in"], entry["d_out"]):
            raise LowrankError(f"manifest layer '{name}' ({entry['d_out']}x{entry['d_in']}) does not match the model's {dense!r}")
        set_submodule(model, name, LowRankLinear(entry["d_in"], entry["d_out"], entry["rank"], bias=entry["bias"]))
    return model
