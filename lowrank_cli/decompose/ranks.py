"""Rank rules: how many singular values a layer keeps (docs/algorithms.md §1, §5)."""

from __future__ import annotations

import math

import torch


def rank_for_kappa(d_in: int, d_out: int, kappa: float) -> int:
    """PELA's rank rule: r = floor(d_in·d_out / (κ·(d_in + d_out))), at least 1 and at most min(d_in, d_out)."""
    full = min(d_in, d_out)
    r = d_in * d_out / (d_in + d_out) / kappa  # no overflow to a huge int: capped at full rank below
    if not r < full:  # also inf, for a vanishing κ
        return full
    # the epsilon keeps exact quotients (e.g. 288.0) from flooring to 287 through rounding
    return max(1, math.floor(r + 1e-9))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values keep `energy` of Σσ² (0 < energy ≤ 1)."""
    power = singular_values.double().pow(2)
    kept = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
    return int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=kept.dtype)).item()) + 1


def energy_kept(singular_values: torch.Tensor, rank: int) -> float:
    """Σ_{i≤r} σ_i² / Σ σ_i²: the fraction of the squared Frobenius norm the rank keeps."""
    power = singular_values.double().pow(2)
    return float(power[:rank].sum() / power.sum().clamp_min(1e-300))


def max_shrinking_rank(d_in: int, d_out: int) -> int:
    """The largest r with r·(d_in + d_out) < d_in·d_out (0 when no rank saves anything)."""
    return math.ceil(d_in * d_out / (d_in + d_out)) - 1


def shrinks(d_in: int, d_out: int, rank: int) -> bool:
    """Whether rank-`rank` factors are smaller than the dense `d_out × d_in` matrix."""
    return rank * (d_in + d_out) < d_in * d_out
