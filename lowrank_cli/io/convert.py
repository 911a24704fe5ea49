"""One-time conversion of pickled PyTorch state dicts to safetensors (weights_only=True only)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.safetensors import save_checkpoint, strip_prefix


def convert_pickle(source: str | os.PathLike, out: str | os.PathLike | None = None, force: bool = False) -> tuple[Path, int]:
    """Load `source` with `torch.load(weights_only=True)` and write its tensors as safetensors.

    Accepts a bare state dict or one nested under 'model', 'state_dict' or 'model_ema' (timm's
    training checkpoints). Returns the path written and the number of tensors.
    """
    source = Path(source)
    if not source.is_file():
        raise LowrankError(f"{source}: no such file")
    out = Path(out) if out is not None else source.with_suffix(".safetensors")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowrankError(f"{source}: cannot be loaded with weights_only=True ({first})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LowrankError(f"{source}: is not a state dict of tensors (nor one under 'state_dict', 'model' or 'model_ema')")
    tensors = strip_prefix({str(k): v for k, v in obj.items()})
    save_checkpoint(out, tensors, force=force, inputs=(source,))
    return out, len(tensors)
