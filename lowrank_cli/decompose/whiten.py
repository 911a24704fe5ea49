"""Data-aware factors: whitened SVD (SVD-LLM) and ASVD activation scaling (docs/algorithms.md §4).

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
are the same down/up pair as plain SVD, with the scale split evenly:
`up = U_r √n`, `down = √n⁻¹ U_rᵀ W` with `n_i = ‖U_iᵀ W‖` (for plain SVD, `n = σ`).

Tensors in, factors out: the statistics come from `factorize.calibrate`.
"""

from __future__ import annotations

import torch

from lowrank_cli.decompose.svd import svd_device

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


def output_basis(weight: torch.Tensor, scaled: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, σ) of the thin SVD of `scaled` (= W·M), in fp32 (fp64 for fp64 weights), on `svd_device(device)`."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    U, S, _ = torch.linalg.svd(scaled.to(svd_device(device), dtype), full_matrices=False)
    return U, S


def whitened_basis(weight: torch.Tensor, gram: torch.Tensor, floor: float = EIGEN_FLOOR, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, σ) of `W·S`, S the whitening of the input Gram: σ² is output-error energy on the calibration inputs (on `svd_device(device)`)."""
    S = whitening(gram.to(svd_device(device)), floor)
    return output_basis(weight, weight.detach().to(S.device).double() @ S, S.device)


def asvd_basis(weight: torch.Tensor, abs_mean: torch.Tensor, alpha: float = 0.5, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, σ) of `W·diag(mean |x|)^α` (ASVD), on `svd_device(device)`."""
    s = asvd_scale(abs_mean, alpha).to(svd_device(device))
    return output_basis(weight, weight.detach().to(s.device).double() * s, s.device)


def projection_factors(weight: torch.Tensor, U_r: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with `up · down = U_r U_rᵀ W`, the scale split evenly (see the module docstring)."""
    w = weight.detach().to(U_r.device, U_r.dtype)
    P = U_r.T @ w  # r × d_in
    root = P.norm(dim=1).clamp_min(torch.finfo(P.dtype).tiny).sqrt()
    up, down = U_r * root, P / root[:, None]
    dtype = dtype or weight.dtype
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int, floor: float = EIGEN_FLOOR,
                     device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up, down, σ of W·S): the best rank-`rank` factors of `weight` in output norm for inputs with Gram `gram`."""
    U, sigma = whitened_basis(weight, gram, floor, device)
    up, down = projection_factors(weight, U[:, :rank])
    return up, down, sigma
