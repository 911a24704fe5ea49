"""Tensors in, factors out: truncated SVD, rank rules, whitening and ASVD. No modules, no files."""

from lowrank_cli.decompose.ranks import energy_kept, max_shrinking_rank, rank_for_energy, rank_for_kappa, shrinks
from lowrank_cli.decompose.svd import split_factors, svd, svd_device, truncated_factors
from lowrank_cli.decompose.whiten import asvd_basis, asvd_scale, projection_factors, whitened_basis, whitened_factors, whitening

__all__ = [
    "asvd_basis", "asvd_scale", "energy_kept", "max_shrinking_rank", "projection_factors", "rank_for_energy",
    "rank_for_kappa", "shrinks", "split_factors", "svd", "svd_device", "truncated_factors", "whitened_basis",
    "whitened_factors", "whitening",
]
