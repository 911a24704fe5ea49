"""Casting a checkpoint's floating-point tensors to another dtype."""

from __future__ import annotations

import torch

from lowrank_cli.errors import LowrankError
from lowrank_cli.export.precision import balance_factors, require_representable

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    """`float32`, `float16` or `bfloat16` as a torch dtype, or a LowrankError naming those."""
    if name not in DTYPES:
        raise LowrankError(f"dtype '{name}' is not supported; accepted: {', '.join(DTYPES)}", param="dtype")
    return DTYPES[name]


def cast_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every floating-point tensor in `dtype` (None: unchanged); integer tensors are kept."""
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def cast_factorized(tensors: dict[str, torch.Tensor], layers: dict, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A factorized checkpoint's tensors in `dtype` (None: unchanged), `layers` its manifest's entries (`{name: LayerEntry}`):
    the one cast of factors that exports of factors go through. To float16 or bfloat16, each layer's pair is first
    balanced by powers of two (`export.precision.balance_factors`: the float32 outputs stay the same bit for bit, and
    neither half sits at float16's range's ends), and a tensor beyond float16's range is refused in one line."""
    if dtype in (torch.float16, torch.bfloat16):
        tensors = balance_factors(tensors, layers)
        require_representable(tensors, dtype, "the float16 copy")
    return cast_tensors(tensors, dtype)


def dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    """`float32`, or `bfloat16+float32` for mixed checkpoints (floating-point tensors only)."""
    kinds = sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()})
    return "+".join(kinds) or "none"
