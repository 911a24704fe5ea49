"""Safetensors in and out: header validation, reading tensors, writing checkpoints atomically.

Checkpoints are safetensors only. A safetensors file is an 8-byte little-endian header
length, a JSON header (tensor name -> dtype, shape, data offsets; `__metadata__` -> str
map), then the raw data. We validate the header ourselves before handing the file to
`safe_open`, so a wrong file gets a sentence instead of a Rust panic message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.atomic import atomic_output

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "E8M0": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1,
}
_PICKLE_HINT = (
    "lowrank never loads pickles; convert it once with `lowrank convert {path}` "
    "(torch.load with weights_only=True, then safetensors)"
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, as its header describes it (no data read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class CheckpointHeader:
    """The header of a safetensors file: its tensors and its string metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive (PK\x03\x04) since 1.6, a raw pickle (\x80 + protocol) before
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_header(path: str | os.PathLike) -> CheckpointHeader:
    """Read and validate the header of a safetensors file without reading its tensors.

    Raises LowrankError for a missing file, a pickle, a non-safetensors file, a header that is
    not JSON, or a file shorter than its header says (truncated download).
    """
    path = Path(path)
    if not path.exists():
        raise LowrankError(f"{path}: no such file")
    if path.is_dir():
        raise LowrankError(f"{path}: is a directory, expected a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if _looks_like_pickle(head):
            raise LowrankError(f"{path}: looks like a PyTorch pickle (.pth/.pt), not safetensors; " + _PICKLE_HINT.format(path=path))
        if len(head) < 8:
            raise LowrankError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER_BYTES or n > size - 8:
            raise LowrankError(
                f"{path}: not a safetensors file (its first 8 bytes give a header length of {n} "
                f"for a file of {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LowrankError(f"{path}: not a safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise LowrankError(f"{path}: not a safetensors file (its header is not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LowrankError(f"{path}: safetensors '__metadata__' must be a map of strings")
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise LowrankError(f"{path}: header entry '{name}' is not a tensor description (dtype, shape, data_offsets)") from None
        if end > data_bytes:
            raise LowrankError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} of the data section but the file "
                f"holds only {data_bytes} bytes of data (an interrupted download or copy?)"
            )
        ti = TensorInfo(name, dtype, shape)
        if dtype in _DTYPE_BYTES and end - start != ti.numel * _DTYPE_BYTES[dtype]:
            raise LowrankError(f"{path}: tensor '{name}' has {end - start} bytes for shape {list(shape)} of {dtype}")
        tensors[name] = ti
    return CheckpointHeader(path=path, tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()})


@contextlib.contextmanager
def open_tensors(path: str | os.PathLike) -> Iterator[Any]:
    """`safe_open` on a validated file: `.get_tensor(name)` reads one tensor at a time."""
    read_header(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        yield f


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file, with `module.` wrapper prefixes removed."""
    with open_tensors(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return strip_prefix(tensors)


def strip_prefix(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")) -> dict[str, torch.Tensor]:
    """Remove DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes when every key has them."""
    for prefix in prefixes:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    force: bool = False,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write `state_dict` as safetensors atomically, with string `metadata` (e.g. `Manifest.metadata()`)."""
    metadata = {"format": "pt", **(metadata or {})}
    # safetensors refuses shared or strided storage: give it plain contiguous copies
    tensors = {k: v.detach().to("cpu").contiguous().clone() if _shares_storage(v) else v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()
