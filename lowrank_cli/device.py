"""Which torch device a command runs on: one rule for every command and library function."""

from __future__ import annotations

import torch

from lowrank_cli.errors import LowrankError

ACCEPTED = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None = "auto", *, param: str = "device") -> torch.device:
    """`auto` (or None): CUDA when available, else the CPU; `cpu`; `cuda` / `cuda:N` if that GPU exists.

    Anything else, or a GPU that is not there, is a LowrankError naming `param`.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise LowrankError(f"{param} '{name}' is not a device; accepted: {ACCEPTED}", param=param) from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise LowrankError(f"{param} '{name}' is not supported; accepted: {ACCEPTED}", param=param)
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise LowrankError(f"{param} '{name}': CUDA is not available on this machine ({why}); use cpu or auto", param=param)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LowrankError(f"{param} '{name}': this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})", param=param)
    return dev
