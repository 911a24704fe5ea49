"""`LowRankLinear`: two thin linears standing in for one `nn.Linear` (PELA §3.1)."""

from __future__ import annotations

import torch
from torch import nn

from lowrank_cli.decompose.svd import Svd, truncated_factors


class LowRankLinear(nn.Module):
    """`y = up(down(x))`: a rank-`rank` stand-in for an `nn.Linear(in_features, out_features)`.

    `down` (rank × in, no bias) and `up` (out × rank, the original bias). Costs
    `rank·(in_features + out_features)` MACs per token instead of `in·out`.
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
    def from_linear(cls, linear: nn.Linear, rank: int, factors: Svd | None = None) -> "LowRankLinear":
        """The best rank-`rank` factorization of `linear` by truncated SVD, in its dtype and device.

        `factors`: the weight's SVD `(U, S, Vh)` when the caller already computed it.
        """
        up, down = truncated_factors(linear.weight, rank, factors)
        bias = None if linear.bias is None else linear.bias.detach().clone()  # never shared with `linear`
        return cls.from_factors(up, down, bias)

    def merge(self) -> nn.Linear:
        """One dense `nn.Linear` with `W = up · down`, computed in fp32 at least."""
        w = self.up.weight.float() @ self.down.weight.float()
        dense = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None, device="meta")
        dense.weight = nn.Parameter(w.to(self.up.weight.dtype))
        if self.up.bias is not None:
            dense.bias = nn.Parameter(self.up.bias.detach().clone())
        return dense
