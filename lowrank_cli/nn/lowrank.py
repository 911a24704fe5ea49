"""`LowRankLinear` and `LowRankEmbedding`: two thin factors standing in for one dense matrix (PELA §3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import (_global_backward_hooks, _global_backward_pre_hooks, _global_forward_hooks,
                                     _global_forward_pre_hooks)

from lowrank_cli.decompose.svd import Svd, truncated_factors


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D` (transformers): a linear layer whose weight is stored transposed, `(d_in, d_out)`."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of a linear layer with W as `(d_out, d_in)`: an `nn.Linear`'s weight, a `Conv1D`'s transposed."""
    if is_conv1d(module):
        return module.weight.detach().T, module.bias
    return module.weight.detach(), module.bias


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an `nn.Linear` or a `Conv1D`."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return module.in_features, module.out_features


def _plain(module: nn.Module) -> bool:
    """An `nn.Linear` whose call would do nothing but `F.linear`: no hooks of its own or global ones (MAC counting,
    calibration and sensitivity taps hook the halves), not a subclass or a wrapper (FSDP, parametrizations), no `forward` of
    its own (accelerate's hooks replace it), not compiled on its own."""
    return (type(module) is nn.Linear and "forward" not in vars(module) and getattr(module, "_compiled_call_impl", None) is None
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)
            and not (_global_forward_hooks or _global_forward_pre_hooks or _global_backward_hooks or _global_backward_pre_hooks))


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
        down, up = self.down, self.up
        if _plain(down) and _plain(up):  # the two products straight away: decoding calls this hundreds of times per token
            return F.linear(F.linear(x, down.weight), up.weight, up.bias)
        return up(down(x))

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
    def from_linear(cls, linear: nn.Module, rank: int, factors: Svd | None = None) -> "LowRankLinear":
        """The best rank-`rank` factorization of `linear` (an `nn.Linear` or a `Conv1D`) by truncated SVD, in its dtype and device.

        `factors`: the SVD `(U, S, Vh)` of its `(d_out, d_in)` weight when the caller already computed it.
        """
        weight, bias = dense_weight(linear)
        up, down = truncated_factors(weight, rank, factors)
        bias = None if bias is None else bias.detach().clone()  # never shared with `linear`
        return cls.from_factors(up.contiguous(), down.contiguous(), bias)

    def merge(self) -> nn.Linear:
        """One dense `nn.Linear` with `W = up · down`, computed in fp32 at least."""
        w = self.up.weight.float() @ self.down.weight.float()
        dense = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None, device="meta")
        dense.weight = nn.Parameter(w.to(self.up.weight.dtype))
        if self.up.bias is not None:
            dense.bias = nn.Parameter(self.up.bias.detach().clone())
        return dense


class LowRankEmbedding(nn.Module):
    """`E ≈ lookup · projᵀ`: a rank-`rank` stand-in for an `nn.Embedding(num_embeddings, embedding_dim)`.

    `lookup` is an `nn.Embedding(num_embeddings, rank)` (the rows), `proj` an `nn.Linear(rank,
    embedding_dim, bias=False)`: `V·r + r·d` parameters instead of `V·d` (ALBERT's factorized
    embedding parameterization). The padding index, if any, stays on `lookup`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = num_embeddings, embedding_dim, rank, padding_idx
        self.lookup = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx, device=device, dtype=dtype)
        self.proj = nn.Linear(rank, embedding_dim, bias=False, device=device, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense table it stands for (V × d), computed: for code that reads an embedding's weight."""
        return self.lookup.weight @ self.proj.weight.T

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.lookup(ids))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int, factors: Svd | None = None) -> "LowRankEmbedding":
        """The best rank-`rank` factorization of `embedding`'s table by truncated SVD: lookup = U_r √Σ, proj = V_r √Σ."""
        table = embedding.weight.detach()
        rows, cols = truncated_factors(table, rank, factors)  # rows: V × r (= U_r √Σ), cols: r × d (= √Σ V_rᵀ)
        layer = cls(table.shape[0], table.shape[1], rank, embedding.padding_idx, device="meta")
        layer.lookup.weight = nn.Parameter(rows.contiguous())
        layer.proj.weight = nn.Parameter(cols.T.contiguous())
        return layer

    def merge(self) -> nn.Embedding:
        """One dense `nn.Embedding` with `E = lookup · projᵀ`, computed in fp32 at least."""
        table = self.lookup.weight.float() @ self.proj.weight.float().T
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device="meta")
        dense.weight = nn.Parameter(table.to(self.lookup.weight.dtype))
        return dense


def inference_layout(model: nn.Module) -> int:
    """Store each low-rank layer's widening half (`LowRankLinear.up`, `LowRankEmbedding.proj`: rank → wider output)
    column-major, in place; returns how many were changed. The values, shapes and names stay the same; the outputs
    are equal up to rounding (summation order).

    `F.linear(z, W)` reads W (d_out × r) row by row: r numbers per dot product, few for a thin factor. Stored
    column-major, Wᵀ is a contiguous r × d_out matrix and the product streams d_out numbers per input feature instead,
    which a matrix–vector product reads faster: measured 1.75–2.2× per up factor at one token and 1.2–1.5× at eight on
    one CPU thread in fp32, SmolLM2-135M's shapes at κ = 2 (`tests/benchmarks/bench_inference_layout.py`; not measured
    on CUDA). The state dict's tensors of those halves are then not contiguous: lowrank's writers store them contiguous
    as always, but `safetensors.torch.save_file` wants `.contiguous()` first. A half shared with another module
    (tied, by parameter identity), on the meta device, or under a parametrization is left as it is.
    """
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    changed = 0
    for module in model.modules():
        half = module.up if isinstance(module, LowRankLinear) else module.proj if isinstance(module, LowRankEmbedding) else None
        if half is None or "weight" not in half._parameters or half.weight.device.type == "meta" or uses.get(id(half.weight), 0) > 1:
            continue
        w = half.weight
        if w.shape[1] < w.shape[0] and w.stride() != (1, w.shape[0]):
            half.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
            changed += 1
    return changed
