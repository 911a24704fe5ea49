"""PC-LoRA (docs/algorithms.md §3): progressive compression, fading the original weights out while adapters learn.

Each selected linear becomes `F(x) = λ(n)·(W₀ x + b₀) + B(A(x)) + C` with `A = down`,
`B = up` and `C = up.bias` trainable and the frozen branch `(W₀, b₀)` untouched by the
optimizer. A layer without a bias (Llama's) gets no `C` either: its PELA student has none, and
the PC-LoRA student must have the same structure (and load by the same manifest). λ goes from 1 to 0 over the first q optimizer steps and stays 0; then the frozen
branch is dropped and what remains is exactly a `LowRankLinear`: the structure and manifest
of a PELA student.

The frozen branch is the part of the original layer that the adapters do not yet explain:
`W₀ = W − B₀A₀`, `b₀ = b − C₀` for the initial adapters. With the paper's LoRA
initialisation (A random, B = 0, C = 0) that is exactly `(W, b)`, the paper's formula. With
the SVD initialisation (A, B from the top-r SVD of W, C = b) it makes the layer equal to
the original at step 0 *and* equal to the SVD-factorized layer at λ = 0, instead of
counting the top-r part of W twice.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.decompose.svd import truncated_factors
from lowrank_cli.nn.lowrank import LowRankLinear, dense_weight, linear_dims
from lowrank_cli.nn.surgery import replace_modules

Schedule = Literal["linear", "sine", "one_minus_cosine"]
AdapterInit = Literal["lora", "svd"]


def decay_lambda(schedule: Schedule, step: int, decay_steps: int) -> float:
    """λ at optimizer step `step` (0-based): 1 at step 0, exactly 0 from `decay_steps` on.

    linear: 1 − n/q; sine: 1 − sin(πn/2q); one_minus_cosine: cos(πn/2q).
    """
    if decay_steps <= 0 or step >= decay_steps:
        return 0.0
    t = step / decay_steps
    if schedule == "linear":
        return 1.0 - t
    if schedule == "sine":
        return 1.0 - math.sin(math.pi * t / 2)
    if schedule == "one_minus_cosine":
        return math.cos(math.pi * t / 2)
    raise ValueError(f"unknown schedule {schedule!r}; accepted: linear, sine, one_minus_cosine")


class PCLoRALinear(nn.Module):
    """`λ·(W₀ x + b₀) + up(down(x))`: a linear layer on its way to low rank.

    `lam` is a plain float set from the step by `set_lambda` (no tensor, so reading it
    never syncs a GPU); the frozen branch is skipped entirely once λ = 0.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        # frozen parameters, not buffers: DDP would broadcast buffers at every forward
        self.frozen_weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False)
        self.frozen_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # up.bias is C, when the layer has a bias
        self.lam = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.down(x))
        if self.lam != 0.0:
            out = out + self.lam * F.linear(x, self.frozen_weight, self.frozen_bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, lam={self.lam:.4f}"

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, init: AdapterInit = "lora", generator: torch.Generator | None = None,
                    svd_device: torch.device | None = None) -> "PCLoRALinear":
        """Wrap `linear` (an `nn.Linear` or GPT-2's `Conv1D`) with rank-`rank` adapters; the result equals `linear` at λ = 1."""
        w, b = dense_weight(linear)
        d_in, d_out = linear_dims(linear)
        layer = cls(d_in, d_out, rank, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if init == "lora":  # as LoRA: A ~ kaiming-uniform(a=√5), B = 0, C = 0
                bound = 1 / math.sqrt(d_in)
                layer.down.weight.uniform_(-bound, bound, generator=generator)
                layer.up.weight.zero_()
                if layer.up.bias is not None:
                    layer.up.bias.zero_()
            elif init == "svd":
                up, down = truncated_factors(w, rank, device=svd_device)
                layer.down.weight.copy_(down)
                layer.up.weight.copy_(up)
                if b is not None:
                    layer.up.bias.copy_(b.detach())
            else:
                raise ValueError(f"unknown adapter init {init!r}; accepted: lora, svd")
            initial = layer.up.weight.float() @ layer.down.weight.float()
            layer.frozen_weight.copy_((w.float() - initial).to(w.dtype))
            if layer.frozen_bias is not None:
                layer.frozen_bias.copy_(b.detach() - layer.up.bias)
        return layer

    def to_low_rank(self) -> LowRankLinear:
        """The adapters alone (what the layer computes at λ = 0), as a `LowRankLinear`."""
        bias = None if self.up.bias is None else self.up.bias.detach().clone()
        return LowRankLinear.from_factors(self.up.weight.detach().clone(), self.down.weight.detach().clone(), bias)


def set_lambda(model: nn.Module, lam: float) -> None:
    """Set λ on every `PCLoRALinear` of the model."""
    for module in model.modules():
        if isinstance(module, PCLoRALinear):
            module.lam = float(lam)


def finalize(model: nn.Module) -> nn.Module:
    """Drop the frozen branches: every `PCLoRALinear` becomes the `LowRankLinear` of its adapters."""
    replace_modules(model, lambda _name, m: m.to_low_rank(), lambda _name, m: isinstance(m, PCLoRALinear))
    return model
