"""Data-aware factorization: whitened SVD (SVD-LLM) and ASVD activation scaling (ALGORITHMS.md §4).

Plain SVD minimises ‖W − W'‖_F. These minimise the layer's output error on calibration
inputs X instead, by taking the SVD of `W·M` for an input-side matrix M:

- `whitened`: M = S with `G = X Xᵀ = S Sᵀ`, from the eigendecomposition `G = Q Λ Qᵀ`,
  `S = Q Λ^{1/2}` (Λ floored at a small fraction of its largest value, so a singular or
  slightly indefinite Gram never fails; no Cholesky). Then `‖(W − W')X‖_F = ‖(W − W')S‖_F`,
  and truncating `W S` gives the best rank-r W' in output norm on the calibration inputs.
- `asvd`: M = diag(mean |x_j|)^α, α = 0.5 (ASVD's activation scaling).

Mapping back: with `W M = U Σ Vᵀ`, `W' = U_r Σ_r V_rᵀ M⁻¹`. Since `Σ_r V_rᵀ = U_rᵀ W M`,
this is `W' = U_r U_rᵀ W` exactly: the projection of W's outputs onto the top-r left
singular vectors of `W M`. We compute it that way, never forming `M⁻¹`, so that floored
eigen-directions (inputs the calibration data never showed) are not amplified. The factors
are the same `LowRankLinear` down/up pair as plain SVD, with the scale split evenly:
`up = U_r √n`, `down = √n⁻¹ U_rᵀ W` with `n_i = ‖U_iᵀ W‖` (for plain SVD, `n = σ`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from lowrank_cli.calibrate import collect_input_stats, gram_groups
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize import LowRankLinear, set_submodule, svd_device
from lowrank_cli.recipe import Recipe
from lowrank_cli.select import LayerPlan, rule_of, set_rank

EIGEN_FLOOR = 1e-6  # relative to the largest eigenvalue of the Gram


def whitening(gram: torch.Tensor, floor: float = EIGEN_FLOOR) -> torch.Tensor:
    """S with `S Sᵀ ≈ G` (fp64): `S = Q Λ^{1/2}` from `G = Q Λ Qᵀ`, Λ clamped to `floor · λ_max`.

    Never fails: a singular, rank-deficient or slightly indefinite (rounding) Gram gets its
    small eigenvalues raised to the floor; an all-zero Gram gives the identity.
    """
    g = gram.double()
    g = (g + g.T) / 2  # exact symmetry for eigh
    lam, Q = torch.linalg.eigh(g)
    top = float(lam.max())
    if not top > 0:
        return torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    return Q * lam.clamp_min(floor * top).sqrt()


def asvd_scale(abs_mean: torch.Tensor, alpha: float = 0.5, floor: float = 1e-6) -> torch.Tensor:
    """ASVD's per-input-feature scale `(mean |x_j|)^α`, floored at `floor ·` its largest value."""
    s = abs_mean.double().pow(alpha)
    top = float(s.max())
    return torch.ones_like(s) if not top > 0 else s.clamp_min(floor * top)


def output_basis(weight: torch.Tensor, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, σ) of the thin SVD of `scaled` (= W·M), in fp32 (fp64 for fp64 weights), on the SVD device."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    U, S, _ = torch.linalg.svd(scaled.to(svd_device(), dtype), full_matrices=False)
    return U, S


def projection_factors(weight: torch.Tensor, U_r: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with `up · down = U_r U_rᵀ W`, the scale split evenly (see the module docstring)."""
    w = weight.detach().to(U_r.device, U_r.dtype)
    P = U_r.T @ w  # r × d_in
    root = P.norm(dim=1).clamp_min(torch.finfo(P.dtype).tiny).sqrt()
    up, down = U_r * root, P / root[:, None]
    dtype = dtype or weight.dtype
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int, floor: float = EIGEN_FLOOR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up, down, σ of W·S): the best rank-`rank` factors of `weight` in output norm for inputs with Gram `gram`."""
    S = whitening(gram.to(svd_device()), floor)
    U, sigma = output_basis(weight, weight.detach().to(S.device).double() @ S)
    up, down = projection_factors(weight, U[:, :rank])
    return up, down, sigma


Progress = Callable[[str], None]


def factorize_model_data_aware(
    model: nn.Module,
    recipe: Recipe,
    plans: list[LayerPlan],
    calibration: Iterable | None,
    progress: Progress | None = None,
    on_allocation: Callable | None = None,
    decide: Callable[[LayerPlan], object] | None = None,
) -> list[LayerPlan]:
    """Factorize the planned layers of `model` in place with the recipe's `whitened` or `asvd` method.

    `calibration`: image batches (or (images, labels) pairs), passed through the dense
    model once per group of Grams (see `calibrate.gram_groups`). Every layer's statistics
    are taken on the *original* model's inputs; the layers are swapped for `LowRankLinear`s
    only after all passes. With `rank_rule: budget`, ranks are allocated on the spectra of
    `W·M` (output-error energy) and the allocation is given to `on_allocation`.
    `decide(plan)` (latency-aware selection) may turn a planned layer dense once its rank is known.
    """
    fac = recipe.factorize
    if calibration is None:
        raise LowrankError(
            f"factorize.method '{fac.method}' needs calibration data: pass --calib-data DIR|digits|synthetic "
            "(and --calib-samples N), or set factorize.calib_data in the recipe"
        )
    todo = [p for p in plans if p.factorized]
    by_name = {p.name: p for p in todo}
    whitened = fac.method == "whitened"
    budget = fac.rank_rule == "budget"
    groups = gram_groups(model, [p.name for p in todo], fac.calib_max_gram_mb * 2**20) if whitened else [[p.name for p in todo]]
    if len(groups) > 1 and iter(calibration) is calibration:  # a one-shot iterator: keep it for the next passes
        calibration = list(calibration)

    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for group in groups:
        stats = collect_input_stats(model, group, calibration, gram=whitened)
        for name in group:
            plan, w = by_name[name], model.get_submodule(name).weight.detach()
            st = stats.pop(name)
            if whitened:
                S = whitening(st.gram.to(svd_device()))
                U, sigma = output_basis(w, w.to(S.device).double() @ S)
                del S
            else:
                s = asvd_scale(st.abs_mean, fac.asvd_alpha).to(svd_device())
                U, sigma = output_basis(w, w.to(s.device).double() * s)
            if budget:  # keep the basis up to the largest rank that could still shrink the layer
                from lowrank_cli.budget import max_shrinking_rank

                keep = max_shrinking_rank(plan.d_in, plan.d_out)
            else:
                set_rank(plan, *rule_of(plan), sigma.cpu())
                keep = plan.rank if plan.factorized else 0
            bases[name] = (U[:, :keep].clone(), sigma.cpu())
            del U, st
            if progress is not None:
                progress(name)
        del stats

    if budget:
        from lowrank_cli.budget import allocate_for_model

        alloc = allocate_for_model(model, plans, recipe, lambda n: bases[n][1], spectrum_kind=fac.method)
        if on_allocation is not None:
            on_allocation(alloc)

    for plan in todo:
        U, _ = bases.pop(plan.name)
        if decide is not None and plan.factorized:
            decide(plan)
        if not plan.factorized:
            continue
        linear = model.get_submodule(plan.name)
        up, down = projection_factors(linear.weight, U[:, : plan.rank])
        bias = None if linear.bias is None else linear.bias.detach()
        set_submodule(model, plan.name, LowRankLinear.from_factors(up.to(linear.weight.device), down.to(linear.weight.device), bias))
    return plans
