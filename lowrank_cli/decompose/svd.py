"""Truncated SVD factors of a weight matrix (PELA §3.1; docs/algorithms.md §1).

`W ≈ up · down` with `down = √Σ_r V_rᵀ` (r × d_in) and `up = U_r √Σ_r` (d_out × r): the
best rank-r approximation of W (Eckart–Young), √Σ split into both factors so that they
have the same scale. Tensors in, tensors out: no modules, no files.
"""

from __future__ import annotations

import torch

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def svd_device(device: torch.device | str | None = None) -> torch.device:
    """Where SVDs run: `device` when given (the command's device), else the GPU when there is one."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def svd(weight: torch.Tensor, device: torch.device | None = None) -> Svd:
    """Thin SVD `(U, S, Vh)` of a weight in fp32 (fp64 stays fp64), on `svd_device(device)`."""
    w = weight.detach().to(svd_device(device))
    w = w.double() if w.dtype == torch.float64 else w.float()
    return torch.linalg.svd(w, full_matrices=False)


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (U_r √Σ_r, √Σ_r V_rᵀ) in `dtype`, on the SVD's device."""
    root = S[:rank].sqrt()
    up = (U[:, :rank] * root).to(dtype)
    down = (root[:, None] * Vh[:rank]).to(dtype)
    return up.contiguous(), down.contiguous()


def truncated_factors(weight: torch.Tensor, rank: int, factors: Svd | None = None, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down): the best rank-`rank` factors of `weight`, in its dtype and on its device.

    `factors` is the weight's SVD when the caller already has it (the energy rule needs σ
    before it knows the rank), so that it is not computed twice; else it is computed on `svd_device(device)`.
    """
    U, S, Vh = factors if factors is not None else svd(weight, device)
    up, down = split_factors(U, S, Vh, rank, weight.dtype)
    return up.to(weight.device), down.to(weight.device)
