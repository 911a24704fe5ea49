"""The safetensors header is validated field by field before anything else reads the file."""

import json
import struct

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS
from safetensors.torch import save_file

from lowrank_cli.errors import LowrankError
from lowrank_cli.io import read_header
from lowrank_cli.io.manifest import read_checkpoint, save_factorized
from lowrank_cli.models import load
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe

A = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
B = {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}


def raw_file(tmp_path, header, data: bytes = bytes(32), text: str | None = None):
    body = (text if text is not None else json.dumps(header)).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path



@pytest.mark.parametrize("header,needle", [
    ({"a": {**A, "data_offsets": None}, "b": B}, "data_offsets None are not two integers"),
    ({"a": {**A, "data_offsets": ["0", "16"]}, "b": B}, "are not two integers"),
    ({"a": {**A, "data_offsets": [0.0, 16.0]}, "b": B}, "are not two integers"),
    ({"a": {**A, "data_offsets": [16, 0]}, "b": B}, "0 <= begin <= end"),
    ({"a": {**A, "data_offsets": [0, 16, 32]}, "b": B}, "are not two integers"),
    ({"a": A, "b": {**B, "data_offsets": [8, 24]}}, "overlaps 'a'"),
    ({"a": A, "b": {**B, "shape": [2], "data_offsets": [16, 24]}}, "its tensors cover 24"),
    ({"a": {**A, "shape": [-2, -2]}, "b": B}, "shape [-2, -2] is not a list of non-negative integers"),
    ({"a": {**A, "shape": [2, 2.5]}, "b": B}, "is not a list of non-negative integers"),
    ({"a": {**A, "shape": "2x2"}, "b": B}, "is not a list of non-negative integers"),
    ({"a": {**A, "dtype": "F31"}, "b": B}, "dtype 'F31' is not one of F64, F32"),
    ({"a": {**A, "dtype": 32}, "b": B}, "dtype 32 is not one of"),
    ({"a": {**A, "dtype": "F16"}, "b": B}, "has 16 bytes for shape [2, 2] of F16 (8 expected)"),
    ({"a": {**A, "extra": 1}, "b": B}, "not a tensor description"),
    ({"a": [1, 2], "b": B}, "not a tensor description"),
    ({"__metadata__": {"k": 1}, "a": A, "b": B}, "'__metadata__' must be a map of strings to strings"),
    ({"__metadata__": ["x"], "a": A, "b": B}, "'__metadata__' must be a map of strings"),
    ({"a": A, "b": {**B, "data_offsets": [16, 48]}}, "truncated"),
])
def test_hostile_header_entries_are_one_sentence(tmp_path, header, needle):
    with pytest.raises(LowrankError) as e:
        read_header(raw_file(tmp_path, header))
    assert needle in str(e.value) and str(tmp_path) in str(e.value)


def test_deep_nesting_and_duplicate_keys(tmp_path):
    with pytest.raises(LowrankError, match="nests deeper than 64 levels"):
        read_header(raw_file(tmp_path, None, text="[" * 100_000 + "]" * 100_000))
    with pytest.raises(LowrankError, match="the key 'a' appears twice"):
        read_header(raw_file(tmp_path, None, text='{"a": %s, "a": %s, "b": %s}' % (json.dumps(A), json.dumps(A), json.dumps(B))))
    # brackets inside strings do not count
    path = raw_file(tmp_path, {"__metadata__": {"note": "[[[[" * 40}, "a": A, "b": B})
    assert set(read_header(path).tensors) == {"a", "b"}


def test_a_file_never_loads_with_weights_other_than_written(tmp_path):
    """The manifest records the digest of the tensors written with it: a flipped dtype or swapped offsets fail to load."""
    src = tmp_path / "vit.safetensors"
    torch.manual_seed(0)
    import timm

    save_file(timm.create_model(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS).state_dict(), str(src))
    fact = factorize_checkpoint(src, load_recipe("deit"), tmp_path / "f.safetensors", TINY_VIT, TINY_VIT_KWARGS).out
    data = fact.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])

    def rewrite(h):
        body = json.dumps(h).encode()
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])
        return bad

    flipped = json.loads(json.dumps(header))
    flipped["blocks.0.norm1.weight"]["dtype"] = "I32"  # same byte length: the integers would load as weights
    with pytest.raises(LowrankError, match="blocks.0.norm1.weight: checkpoint int32 vs model float32|differ from those written"):
        load(rewrite(flipped))
    swapped = json.loads(json.dumps(header))
    a, b = "blocks.0.attn.qkv.down.weight", "blocks.1.attn.qkv.down.weight"
    swapped[a]["data_offsets"], swapped[b]["data_offsets"] = swapped[b]["data_offsets"], swapped[a]["data_offsets"]
    with pytest.raises(LowrankError, match="differ from those written with its manifest"):
        load(rewrite(swapped))
    _, manifest, tensors = read_checkpoint(fact)  # the original is fine, and resaving records a new digest
    again = save_factorized(tmp_path / "again.safetensors", {k: v * 1 for k, v in tensors.items()}, manifest)
    assert again.weights_sha256 == manifest.weights_sha256


@pytest.mark.parametrize("length", [0x280, 0x380, 0x480, 0x580])
def test_a_header_length_that_starts_like_a_pickle_is_read(tmp_path, length):
    """8-byte lengths of 0x280..0x5ff ending in 0x80 begin with the bytes of a raw pickle (0x80, protocol 2..5)."""
    text = json.dumps({"a": A, "b": B})
    path = raw_file(tmp_path, None, text=text + " " * (length - len(text)))
    assert path.read_bytes()[:2] == bytes([0x80, length >> 8])
    assert set(read_header(path).tensors) == {"a", "b"}
    pickle = tmp_path / "p.pt"
    pickle.write_bytes(bytes([0x80, length >> 8]) + b"]q\x00" + bytes(40))
    with pytest.raises(LowrankError, match="looks like a PyTorch pickle"):
        read_header(pickle)
