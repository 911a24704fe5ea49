"""Outputs that appear whole or not at all, and the one check every output path goes through."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lowrank_cli.errors import LowrankError


def check_output(path: str | os.PathLike, *, force: bool = False, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output path before any long work: an input (always), an existing file (unless
    `force`), a directory, or a missing parent directory. `atomic_output` checks again at the write."""
    path = Path(path)
    for inp in inputs:
        if Path(inp).exists() and path.exists() and path.resolve() == Path(inp).resolve():
            raise LowrankError(f"{path}: refusing to overwrite the input checkpoint; choose another output path", param="out")
    if path.exists() and path.is_dir():
        raise LowrankError(f"{path}: is a directory, expected a file path", param="out")
    if path.exists() and not force:
        raise LowrankError(f"{path}: already exists; overwrite it with force=True", param="force")
    if not path.parent.exists():
        raise LowrankError(f"{path.parent}: output directory does not exist", param="out")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False, inputs: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    The path is checked by `check_output`. On any error the temporary file is removed, so no
    partial output is ever left behind.
    """
    path = check_output(path, force=force, inputs=inputs)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise unwritable(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make it 0600; give the usual mode
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a folder made read-only meanwhile
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise unwritable(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output_folder(path: str | os.PathLike, *, force: bool = False, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output folder before any long work: an input or a folder holding one, an existing path (unless
    `force`, and then only a folder), or a missing parent."""
    path = Path(path)
    for inp in inputs:
        inp = Path(inp)
        if path.exists() and inp.exists() and (path.resolve() == inp.resolve() or path.resolve() in inp.resolve().parents):
            raise LowrankError(f"{path}: refusing to overwrite the input checkpoint; choose another output path", param="out")
    if path.exists() and not force:
        raise LowrankError(f"{path}: already exists; overwrite it with force=True", param="force")
    if path.exists() and not path.is_dir():
        raise LowrankError(f"{path}: is a file, expected a folder path", param="out")
    if not path.parent.exists():
        raise LowrankError(f"{path.parent}: output directory does not exist", param="out")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, force: bool = False, inputs: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds (a folder
    replaced with `force` is removed only once the new one is in place). On error nothing is left."""
    path = check_output_folder(path, force=force, inputs=inputs)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise unwritable(path, e) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise unwritable(path, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unwritable(path: Path, e: OSError) -> LowrankError:
    """The error for an output that cannot be written: the path and the system's reason."""
    return LowrankError(f"{path}: cannot be written ({e.strerror or e})", param="out")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write (or replace) a text file atomically."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
