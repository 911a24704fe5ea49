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
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.atomic import atomic_output

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit
_MAX_NESTING = 64  # a header is three levels deep; a deeper one is hostile (json would recurse until it fails)
_DTYPE_BYTES = {  # what safetensors and torch read: bytes per element
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # the dtypes weights are stored in
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

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES.get(self.dtype, 4)


@dataclass
class CheckpointHeader:
    """The header of a checkpoint: its tensors and its string metadata.

    A checkpoint is one safetensors file, or a sharded one (a Hub folder's
    `model.safetensors.index.json` and its shards): then `path` is the folder or the index and
    `files` says which shard holds each tensor.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def file_of(self, name: str) -> Path:
        return self.files.get(name, self.path)

    @property
    def folder(self) -> Path | None:
        """The Hub-style folder the checkpoint lies in (one with a config.json), if any."""
        base = self.path if self.path.is_dir() else self.path.parent
        return base if (base / "config.json").is_file() else None


INDEX_SUFFIX = ".safetensors.index.json"


def checkpoint_files(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The safetensors files of a checkpoint: a file; a folder's `model.safetensors` (a Hub folder) or
    `student.safetensors` (a training run's folder); or the shards of a `*.safetensors.index.json`
    (given, or in the folder). Returns (the path to name in messages, files)."""
    path = Path(path)
    if not path.exists():
        raise LowrankError(f"{path}: no such file")
    if path.is_dir():
        single, index, student = path / "model.safetensors", path / f"model{INDEX_SUFFIX}", path / "student.safetensors"
        if single.is_file():
            return single, [single]
        if index.is_file():
            return path, _shards(index)
        if student.is_file():
            return student, [student]
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))
        hint = f" (it holds {', '.join(found[:3])}: convert a pickled one with `lowrank convert`)" if found else ""
        raise LowrankError(f"{path}: a folder without model.safetensors, model{INDEX_SUFFIX} or a run's student.safetensors{hint}")
    if path.name.endswith(INDEX_SUFFIX):
        return path, _shards(path)
    return path, [path]


def _shards(index: Path) -> list[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowrankError(f"{index}: not a valid JSON index ({getattr(e, 'msg', e)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise LowrankError(f"{index}: its 'weight_map' must map tensor names to shard file names")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        if Path(name).name != name or name in (".", ".."):
            raise LowrankError(f"{index}: shard '{name}' is not a file name in the index's folder")
        shard = index.parent / name
        if not shard.is_file():
            raise LowrankError(f"{index}: shard '{name}' is missing from the folder (listed for {sum(v == name for v in weight_map.values())} tensors)")
        shards.append(shard)
    return shards


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive (PK\x03\x04) since 1.6, a raw pickle (\x80 + protocol) before
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _nesting_depth(raw: bytes) -> int:
    """The deepest nesting of JSON arrays/objects in `raw`, brackets inside strings ignored."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > _MAX_NESTING:
                return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key '{k}' appears twice")
        out[k] = v
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str | os.PathLike) -> CheckpointHeader:
    """Read and validate the header of a checkpoint (a file, a Hub folder, or a sharded index) without reading its tensors.

    A sharded checkpoint's headers are merged; a tensor in two shards, or one that the index
    places in another shard than the one holding it, is a LowrankError. Its metadata is the index's
    string `metadata` (where a factorized folder in shards keeps its manifest).
    """
    where, files = checkpoint_files(path)
    if len(files) == 1:
        return read_file_header(files[0])
    index = where if where.is_file() else where / f"model{INDEX_SUFFIX}"
    data = json.loads(index.read_text(encoding="utf-8"))
    weight_map = data["weight_map"]
    # the index's string metadata (a factorized folder's manifest); its `total_size` is a number, not metadata of ours
    extra = data.get("metadata")
    metadata = {k: v for k, v in extra.items() if isinstance(v, str)} if isinstance(extra, dict) else {}
    tensors: dict[str, TensorInfo] = {}
    owners: dict[str, Path] = {}
    for shard in files:
        for name, info in read_file_header(shard).tensors.items():
            if name in tensors:
                raise LowrankError(f"{index}: tensor '{name}' is in two shards ({owners[name].name}, {shard.name})")
            tensors[name], owners[name] = info, shard
    misplaced = [n for n, f in weight_map.items() if owners.get(n) is None or owners[n].name != f]
    if misplaced or set(owners) != set(weight_map):
        extra = sorted(set(owners) - set(weight_map))
        raise LowrankError(f"{index}: its weight_map does not match the shards ({len(misplaced)} tensors missing or elsewhere, e.g. "
                           f"{', '.join((misplaced or extra)[:3])})")
    return CheckpointHeader(path=where, tensors=tensors, metadata=metadata, files=owners)


def read_file_header(path: str | os.PathLike) -> CheckpointHeader:
    """Read and validate the header of one safetensors file without reading its tensors.

    Every field is checked before anything else touches the file: the header length, JSON of
    bounded nesting without duplicate keys, string metadata, and for each tensor a known dtype,
    a shape of non-negative integers and two integer offsets whose byte length agrees with
    dtype and shape; together the tensors cover the data section exactly, in order, without
    overlap. Raises LowrankError naming the file and the entry for anything else (a missing
    file, a pickle, a truncated download, a hostile header).
    """
    path = Path(path)
    if not path.exists():
        raise LowrankError(f"{path}: no such file")
    if path.is_dir():
        raise LowrankError(f"{path}: is a directory, expected a .safetensors file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            # a header length of 0x280..0x5ff bytes ending in 0x80 starts like a raw pickle: a JSON header after it says which
            plausible = len(head) == 9 and 0 < struct.unpack("<Q", head[:8])[0] <= min(_MAX_HEADER_BYTES, size - 8) and head[8:] == b"{"
            if _looks_like_pickle(head) and not plausible:
                raise LowrankError(f"{path}: looks like a PyTorch pickle (.pth/.pt), not safetensors; " + _PICKLE_HINT.format(path=path))
            if len(head) < 8:
                raise LowrankError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head[:8])
            f.seek(8)
            if n == 0 or n > _MAX_HEADER_BYTES or n > size - 8:
                raise LowrankError(
                    f"{path}: not a safetensors file (its first 8 bytes give a header length of {n} "
                    f"for a file of {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise LowrankError(f"{path}: cannot be read ({e.strerror or e})") from None
    if _nesting_depth(raw) > _MAX_NESTING:
        raise LowrankError(f"{path}: not a safetensors file (its header nests deeper than {_MAX_NESTING} levels)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LowrankError(f"{path}: not a safetensors file (its header is not valid JSON)") from None
    except ValueError as e:
        raise LowrankError(f"{path}: not a safetensors file (in its header, {e})") from None
    if not isinstance(header, dict):
        raise LowrankError(f"{path}: not a safetensors file (its header is not a JSON object)")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LowrankError(f"{path}: safetensors '__metadata__' must be a map of strings to strings")
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        where = f"{path}: header entry '{name}'"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise LowrankError(f"{where} is not a tensor description (exactly dtype, shape, data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise LowrankError(f"{where}: dtype {dtype!r} is not one of {', '.join(_DTYPE_BYTES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise LowrankError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise LowrankError(f"{where}: data_offsets {offsets!r} are not two integers 0 <= begin <= end")
        start, end = offsets
        if end > data_bytes:
            raise LowrankError(
                f"{path}: truncated: tensor '{name}' ends at byte {end} of the data section but the file "
                f"holds only {data_bytes} bytes of data (an interrupted download or copy?)"
            )
        ti = TensorInfo(name, dtype, tuple(shape))
        if end - start != ti.numel * _DTYPE_BYTES[dtype]:
            raise LowrankError(f"{path}: tensor '{name}' has {end - start} bytes for shape {shape} of {dtype} ({ti.numel * _DTYPE_BYTES[dtype]} expected)")
        tensors[name] = ti
        spans.append((start, end, name))
    position, previous = 0, None
    for start, end, name in sorted(spans):
        if start != position:
            what = f"overlaps '{previous}'" if start < position else f"leaves {start - position} bytes unused before it"
            raise LowrankError(f"{path}: tensor '{name}' starts at byte {start} of the data section and {what}")
        position, previous = end, name
    if position != data_bytes:
        raise LowrankError(f"{path}: the data section holds {data_bytes} bytes but its tensors cover {position}")
    return CheckpointHeader(path=path, tensors=tensors, metadata=dict(metadata))


class _Tensors:
    """`keys()` and `get_tensor(name)` over the safetensors files of one checkpoint."""

    def __init__(self, header: CheckpointHeader, handles: dict[Path, Any]):
        self.header, self.handles = header, handles

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        where = self.header.file_of(name)
        try:
            return self.handles[where].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise LowrankError(f"{where}: tensor '{name}' cannot be read ({_first_line(e)})") from None


@contextlib.contextmanager
def open_tensors(path: str | os.PathLike) -> Iterator[_Tensors]:
    """The validated checkpoint, open: `.get_tensor(name)` reads one tensor at a time (from its shard)."""
    header = read_header(path)
    files = sorted(set(header.files.values())) or [header.path]
    with contextlib.ExitStack() as stack:
        handles = {}
        for f in files:
            try:
                handles[f] = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as e:
                raise LowrankError(f"{f}: cannot be read ({_first_line(e)})") from None
        yield _Tensors(header, handles)


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
    """SHA-256 of a checkpoint's bytes, read in 4 MiB chunks (of each shard in turn, for a sharded one)."""
    _, files = checkpoint_files(path)
    h = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
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
    # safetensors refuses shared or strided storage (tied weights, views): give it plain contiguous copies
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        v = v.detach().to("cpu").contiguous()
        shared = _shares_storage(v) or (v.numel() and v.data_ptr() in seen)
        seen.add(v.data_ptr())
        tensors[k] = v.clone() if shared else v
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except (SafetensorError, OSError) as e:  # a full disk reaches us as a SafetensorError from the Rust writer
            raise LowrankError(f"{path}: cannot be written ({_first_line(e)})", param="out") from None
    return Path(path)


def _first_line(e: BaseException) -> str:
    """The reason in an exception, first line; for the Rust writer's IoError, its system message."""
    text = (getattr(e, "strerror", None) or str(e)).strip()
    system = re.search(r'message: "([^"]+)"', text) or re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", text.splitlines()[0] if text else "")
    if system:
        return system.group(1)
    return text.splitlines()[0] if text else type(e).__name__


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


# -- sizes -------------------------------------------------------------------------------------
DEFAULT_SHARD_SIZE = "5GB"  # save_pretrained's default
SHARD_SIZE = re.compile(r"([0-9]+)(GiB|MiB|KiB|GB|MB|KB)", re.IGNORECASE)  # what save_pretrained's max_shard_size reads
_UNITS = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3}


def shard_bytes(size: int | str | None, param: str = "max_shard_size") -> int:
    """A shard size in bytes: a positive number of bytes, or digits and a unit (`500MB`, `2GB`, `1GiB`: units of 1000 or
    1024 as transformers reads them); None is the default (5GB). Anything else is a LowrankError naming `param`."""
    if size is None:
        size = DEFAULT_SHARD_SIZE
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = SHARD_SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None or int(match.group(1)) == 0:
        raise LowrankError(f"{param} {size!r} is not a size; accepted: a positive number of bytes, or digits and a unit such as "
                           "'500MB', '2GB' or '1GiB'", param=param)
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


# -- reading one tensor at a time ----------------------------------------------------------------
_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _TORCH_DTYPES.items()}


def _data_spans(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(where the data section starts, each tensor's [begin, end) in it) of a file whose header `read_file_header` validated."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    header.pop("__metadata__", None)
    return 8 + n, {name: tuple(info["data_offsets"]) for name, info in header.items()}


class TensorReader:
    """`keys()` and `get_tensor(name)` over a checkpoint's files with positioned reads (no memory map): a tensor takes memory
    while the caller holds it, and nothing of the file stays mapped into the process once it is read. What streamed
    factorization reads its weights with, so that its resident memory is what it holds, not what it has read."""

    def __init__(self, header: CheckpointHeader):
        self.header = header
        self._files: dict[Path, Any] = {}
        self._spans: dict[Path, tuple[int, dict[str, tuple[int, int]]]] = {}

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self.header.tensors[name]
        if info.dtype not in _TORCH_DTYPES:
            raise LowrankError(f"{self.header.file_of(name)}: tensor '{name}' is stored as {info.dtype}, which streamed reading does not take")
        where = self.header.file_of(name)
        try:
            if where not in self._files:
                self._files[where] = open(where, "rb")
                self._spans[where] = _data_spans(where)
            start, spans = self._spans[where]
            begin, end = spans[name]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            view, f = memoryview(buf.numpy()), self._files[where]
            f.seek(start + begin)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise OSError(f"it ends before tensor '{name}' does")
                done += got
        except OSError as e:
            raise LowrankError(f"{where}: tensor '{name}' cannot be read ({e.strerror or e})") from None
        return buf.view(_TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


@contextlib.contextmanager
def read_tensors(path: str | os.PathLike | CheckpointHeader) -> Iterator[TensorReader]:
    """The validated checkpoint (a file, a Hub folder or a sharded index), its tensors read one at a time by `TensorReader`."""
    reader = TensorReader(path if isinstance(path, CheckpointHeader) else read_header(path))
    try:
        yield reader
    finally:
        reader.close()


# -- writing shards as tensors come --------------------------------------------------------------
def digest_update(h: Any, name: str, dtype: torch.dtype, shape: tuple[int, ...] | list[int], chunks: Iterator[bytes] | None = None) -> None:
    """One tensor's part of `manifest.tensors_digest`: its name, dtype and shape, then its bytes (`chunks`)."""
    h.update(f"{name}\0{dtype}\0{list(shape)}\0".encode())
    for chunk in chunks or ():
        h.update(chunk)


@dataclass
class _Shard:
    data: Path  # its tensors' bytes, in order, until the header is known
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = field(default_factory=dict)  # name -> dtype, shape, begin, end
    size: int = 0


class ShardWriter:
    """Tensors written to disk as they come, into shards of at most `max_bytes` (a tensor larger than that gets a shard
    of its own, as transformers does), inside `folder` (a temporary folder the caller renames into place).

    A safetensors header comes first in its file but holds the metadata (the manifest and its digest of every tensor),
    which is known only when the last tensor is in: each shard's bytes go to a data file as they come, and `finish`
    writes every shard as header + data. Memory stays at one tensor; the disk holds the output twice at the end.
    One shard is `model.safetensors` with the metadata in its header; several are `model-0000N-of-0000M.safetensors`
    with the index `model.safetensors.index.json`, whose `metadata` carries the metadata besides `total_size`.
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.shards: list[_Shard] = []
        self._out: Any = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _CODES:
            raise LowrankError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors shards here do not take")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        nbytes = data.numel()
        if not self.shards or (self.shards[-1].size and self.shards[-1].size + nbytes > self.max_bytes):
            self._next_shard()
        shard = self.shards[-1]
        shard.entries[name] = (tensor.dtype, tuple(tensor.shape), shard.size, shard.size + nbytes)
        if nbytes:
            self._out.write(memoryview(data.numpy()))
        shard.size += nbytes

    def _next_shard(self) -> None:
        if self._out is not None:
            self._out.close()
        shard = _Shard(self.folder / f".shard{len(self.shards) + 1}.data")
        self.shards.append(shard)
        self._out = open(shard.data, "wb")

    def digest(self) -> str:
        """`manifest.tensors_digest` of every tensor added, read back from the data files one chunk at a time."""
        self._flush()
        h = hashlib.sha256()
        where = {name: (shard, e) for shard in self.shards for name, e in shard.entries.items()}
        for name in sorted(where):
            shard, (dtype, shape, begin, end) = where[name]
            digest_update(h, name, dtype, shape, _chunks(shard.data, begin, end))
        return h.hexdigest()

    def finish(self, metadata: dict[str, str]) -> list[str]:
        """Write the shards (and the index, when more than one) with `metadata`; the names of the files written."""
        self._flush()
        if not self.shards:
            self._next_shard()
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for shard, name in zip(self.shards, names):
            shard_metadata = {"format": "pt", **(metadata if n == 1 else {})}
            _write_shard(self.folder / name, shard, shard_metadata)
        if n > 1:
            index = {"metadata": {"total_size": sum(s.size for s in self.shards), **metadata},
                     "weight_map": {t: name for shard, name in zip(self.shards, names) for t in shard.entries}}
            (self.folder / f"model{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2) + "\n")
            names.append(f"model{INDEX_SUFFIX}")
        return names

    def _flush(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def close(self) -> None:
        """Remove what is left of the data files (after `finish`, or on an error)."""
        self._flush()
        for shard in self.shards:
            shard.data.unlink(missing_ok=True)


def _chunks(path: Path, begin: int, end: int, size: int = 1 << 24) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(begin)
        left = end - begin
        while left > 0:
            block = f.read(min(size, left))
            if not block:
                raise OSError(f"{path} ends early")
            left -= len(block)
            yield block


def _write_shard(path: Path, shard: _Shard, metadata: dict[str, str]) -> None:
    """A safetensors file: the header (padded with spaces to 8 bytes, as safetensors pads it), then the data file's bytes."""
    header: dict[str, Any] = {"__metadata__": metadata}
    for name, (dtype, shape, begin, end) in shard.entries.items():
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out, open(shard.data, "rb") as data:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        out.flush()
        size = shard.size
        offset = 0
        while offset < size:  # in the kernel: the data never passes through this process's memory
            sent = os.sendfile(out.fileno(), data.fileno(), offset, size - offset)
            if sent == 0:
                raise OSError(f"{shard.data} ends early")
            offset += sent
    shard.data.unlink()


@contextlib.contextmanager
def shard_writer(folder: Path, max_bytes: int) -> Iterator[ShardWriter]:
    """A `ShardWriter` into `folder` whose data files are removed however the block ends."""
    writer = ShardWriter(folder, max_bytes)
    try:
        yield writer
    finally:
        writer.close()
