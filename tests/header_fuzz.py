"""Seeded mutations of a factorized checkpoint's safetensors header and `lowrank` manifest.

Shared by `tests/io/test_fuzz.py` (a few hundred cases in the suite) and
`tests/benchmarks/bench_fuzz_header.py` (10 000). `mutate(data, rng)` returns the bytes of a
damaged file and a label for the mutation; `outcome(path, reference)` loads it the way a user
would and classifies what happened.
"""

from __future__ import annotations

import copy
import json
import random
import signal
import struct
from pathlib import Path

import torch

from lowrank_cli.errors import LowrankError
from lowrank_cli.io import read_header
from lowrank_cli.models import load

JUNK = [None, True, False, 0, -1, 1, 2**63, -(2**63), 1.5, -0.0, float("1e308"), "", "x", "F32", [], [1], [1, 2, 3], {}, {"a": 1}, [[1]], "0"]
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U32", "I64", "U8", "BOOL", "F8_E4M3", "C64", "Q4", "f32", ""]


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: object, rest: bytes, text: str | None = None) -> bytes:
    body = (text if text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(body)) + body + rest


def _mutate_value(value, rng: random.Random):
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.6:
        return rng.choice([value + 1, value - 1, 0, -value, value * 2, value // 2 if value else 3, 2**31, 2**40])
    if isinstance(value, list) and value and rng.random() < 0.6:
        v = list(value)
        op = rng.randrange(4)
        if op == 0:
            v.pop(rng.randrange(len(v)))
        elif op == 1:
            v.insert(rng.randrange(len(v) + 1), rng.choice([0, 1, 2, -1]))
        elif op == 2:
            i = rng.randrange(len(v))
            v[i] = _mutate_value(v[i], rng)
        else:
            v.reverse()
        return v
    return copy.deepcopy(rng.choice(JUNK))


def _mutate_manifest(m: dict, rng: random.Random) -> tuple[dict, str]:
    m = copy.deepcopy(m)
    layers = m.get("layers") or {}
    choice = rng.randrange(9)
    if choice <= 3 and isinstance(layers, dict) and layers:
        name = rng.choice(sorted(layers))
        entry = layers[name]
        key = rng.choice(["rank", "d_in", "d_out", "bias", "rule", "method", "extra"])
        if key in entry and rng.random() < 0.2:
            del entry[key]
            return m, f"manifest layer.{key} deleted"
        entry[key] = _mutate_value(entry.get(key), rng)
        return m, f"manifest layer.{key}"
    if choice == 4 and isinstance(layers, dict) and layers:
        name = rng.choice(sorted(layers))
        layers[rng.choice([name + ".x", "blocks.99.mlp.fc1", "", "head"])] = layers.pop(name)
        return m, "manifest layer renamed"
    key = rng.choice(["layers", "model_kwargs", "architecture", "family", "format_version", "weights_sha256", "recipe", "source", "distill"])
    if key in m and rng.random() < 0.25:
        del m[key]
        return m, f"manifest {key} deleted"
    m[key] = _mutate_value(m.get(key), rng) if key != "weights_sha256" else rng.choice(["0" * 64, m.get(key, "")[::-1], None, 5])
    return m, f"manifest {key}"


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random mutation of a safetensors file's header (or of its manifest inside the metadata)."""
    header, rest = split(data)
    kind = rng.randrange(10)
    if kind <= 3:  # a tensor entry's field
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        if rng.random() < 0.1:
            del header[name][field]
            return join(header, rest), f"entry {field} deleted"
        header[name][field] = rng.choice(DTYPES) if field == "dtype" and rng.random() < 0.7 else _mutate_value(header[name][field], rng)
        return join(header, rest), f"entry {field}"
    if kind == 4:  # swap two entries' offsets (same-size swaps keep the header consistent)
        names = [k for k in header if k != "__metadata__"]
        a, b = rng.sample(names, 2)
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        return join(header, rest), "offsets swapped"
    if kind <= 7:  # the manifest
        meta = header.get("__metadata__", {})
        manifest, label = _mutate_manifest(json.loads(meta["lowrank"]), rng)
        meta["lowrank"] = json.dumps(manifest) if rng.random() < 0.95 else json.dumps(manifest)[: rng.randrange(1, 40)]
        return join(header, rest), label
    if kind == 8:  # raw bytes of the header text
        text = bytearray(json.dumps(header).encode())
        for _ in range(rng.randint(1, 4)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        return struct.pack("<Q", len(text)) + bytes(text) + rest, "header bytes"
    n = len(data) - len(rest) - 8  # the length prefix, or the file's end
    op = rng.randrange(3)
    if op == 0:
        return struct.pack("<Q", max(0, n + rng.choice([-3, -1, 1, 7, 10**6]))) + data[8:], "header length"
    if op == 1:
        return data[: rng.randrange(8, len(data))], "truncated"
    return data + bytes(rng.randint(1, 64)), "bytes appended"


class _Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Hang()


def outcome(path: Path, reference: dict[str, torch.Tensor], timeout_s: float = 10.0) -> tuple[str, str]:
    """('error', message) for a LowrankError; ('same', '') when it loads the original weights;
    ('different', key) when it loads other weights; ('crash', repr) for any other exception; ('hang', '')."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        read_header(path)
        model = load(path)
    except LowrankError as e:
        return "error", str(e)
    except _Hang:
        return "hang", ""
    except Exception as e:  # noqa: BLE001 - what the fuzzer looks for
        return "crash", f"{type(e).__name__}: {e}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    got = model.state_dict()
    if set(got) != set(reference):
        return "different", "keys"
    for k, v in reference.items():
        if got[k].dtype != v.dtype or got[k].shape != v.shape or not torch.equal(got[k], v):
            return "different", k
    return "same", ""
