"""The manifest: one dataclass that writes, reads, validates and applies the `lowrank` metadata."""

import json

import pytest
import torch
from conftest import tiny_vit
from safetensors.torch import save_file

from lowrank_cli.errors import LowrankError
from lowrank_cli.io import MANIFEST_KEY, LayerEntry, Manifest, read_header
from lowrank_cli.nn import LowRankLinear

V1_WITHOUT_FAMILY = {  # what lowrank 0.1.0 wrote before the family key existed
    "format_version": 1, "lowrank_version": "0.1.0", "architecture": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2},
    "layers": {"blocks.0.attn.qkv": {"rank": 24, "d_in": 64, "d_out": 192, "bias": True, "rule": "kappa=2", "method": "svd"}},
    "recipe": {"name": "deit"}, "source": {"file": "vit.safetensors", "sha256": "ab"}, "something_new": [1, 2],
}


QKV = {"blocks.0.attn.qkv.down.weight": torch.zeros(24, 64), "blocks.0.attn.qkv.up.weight": torch.zeros(192, 24),
       "blocks.0.attn.qkv.up.bias": torch.zeros(192)}


def _write(tmp_path, manifest_json: str, tensors=None):
    path = tmp_path / "m.safetensors"
    save_file(QKV if tensors is None else tensors, str(path), metadata={MANIFEST_KEY: manifest_json})
    return read_header(path)


def test_version_1_without_family_reads_as_timm_and_round_trips(tmp_path):
    m = Manifest.from_header(_write(tmp_path, json.dumps(V1_WITHOUT_FAMILY)))
    assert (m.family, m.architecture, m.weight_only) == ("timm", "vit_tiny_patch16_224", False)
    assert m.layers == {"blocks.0.attn.qkv": LayerEntry(24, 64, 192, True, "kappa=2", "svd")}
    assert m.extra == {"something_new": [1, 2]}  # unknown keys survive a read and a write
    again = Manifest.from_header(_write(tmp_path, m.metadata()[MANIFEST_KEY]))
    assert again == m and again.to_dict()["something_new"] == [1, 2]


def test_weight_only_has_no_family(tmp_path):
    m = Manifest.from_header(_write(tmp_path, json.dumps({**V1_WITHOUT_FAMILY, "architecture": None})))
    assert m.weight_only and m.family is None


@pytest.mark.parametrize("raw,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format_version": 1}), "no 'layers'"),
    (json.dumps({**V1_WITHOUT_FAMILY, "format_version": 7}), "format_version 7 is not supported"),
    (json.dumps({**V1_WITHOUT_FAMILY, "layers": {"a": {"rank": 2}}}), "manifest layer 'a' is not a layer entry"),
])
def test_bad_manifests_are_one_sentence(tmp_path, raw, needle):
    with pytest.raises(LowrankError, match=needle):
        Manifest.from_header(_write(tmp_path, raw))


def test_apply_swaps_the_recorded_layers_and_checks_their_shapes():
    model = tiny_vit()
    m = Manifest.from_dict(V1_WITHOUT_FAMILY)
    m.apply(model)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LowRankLinear) and (qkv.rank, qkv.in_features, qkv.out_features) == (24, 64, 192)
    assert type(model.blocks[0].attn.proj) is torch.nn.Linear
    with pytest.raises(LowrankError, match="does not match"):
        Manifest.from_dict({**V1_WITHOUT_FAMILY, "layers": {"blocks.0.mlp.fc1": {"rank": 2, "d_in": 64, "d_out": 192}}}).apply(tiny_vit())
    with pytest.raises(LowrankError, match="not a module of the model"):
        Manifest.from_dict({**V1_WITHOUT_FAMILY, "layers": {"blocks.9.x": {"rank": 2, "d_in": 64, "d_out": 192}}}).apply(tiny_vit())


@pytest.mark.parametrize("change,needle", [
    ({"blocks.0.attn.qkv.down.weight": torch.zeros(23, 64)}, "has shape [23, 64], but manifest layer 'blocks.0.attn.qkv' (rank 24"),
    ({"blocks.0.attn.qkv.up.bias": None}, "has no tensor 'blocks.0.attn.qkv.up.bias'"),
    ({"blocks.0.attn.qkv.down.weight": torch.zeros(24, 64, dtype=torch.int32)}, "is stored as I32; factorized weights are floating point"),
    ({"blocks.0.attn.qkv.weight": torch.zeros(192, 64)}, "'blocks.0.attn.qkv.weight' should not exist"),
])
def test_manifest_is_checked_against_the_tensors(tmp_path, change, needle):
    tensors = {k: v for k, v in {**QKV, **change}.items() if v is not None}
    with pytest.raises(LowrankError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        Manifest.from_header(_write(tmp_path, json.dumps(V1_WITHOUT_FAMILY), tensors))


@pytest.mark.parametrize("key,value,needle", [
    ("layers", [1, 2], "'layers' must be a map"),
    ("model_kwargs", [1], "'model_kwargs' must be a map"),
    ("architecture", 7, "'architecture' must be a string or null"),
    ("format_version", True, "format_version True is not supported"),
])
def test_manifest_fields_have_their_types(tmp_path, key, value, needle):
    with pytest.raises(LowrankError, match=needle):
        Manifest.from_dict({**V1_WITHOUT_FAMILY, key: value})


@pytest.mark.parametrize("entry,needle", [
    ({"rank": 0, "d_in": 64, "d_out": 192}, "rank 0 is outside 1..min"),
    ({"rank": -3, "d_in": 64, "d_out": 192}, "rank -3 is outside"),
    ({"rank": 65, "d_in": 64, "d_out": 192}, "rank 65 is outside 1..min\\(d_in, d_out\\) = 1..64"),
    ({"rank": "24", "d_in": 64, "d_out": 192}, "must be positive integers"),
    ({"rank": 24.0, "d_in": 64, "d_out": 192}, "must be positive integers"),
    ({"rank": 24, "d_out": 192}, "is not a layer entry"),
    ({"rank": 24, "d_in": 64, "d_out": 192, "method": "magic"}, "method one of svd"),
])
def test_layer_entries_are_checked(entry, needle):
    with pytest.raises(LowrankError, match=needle):
        Manifest.from_dict({**V1_WITHOUT_FAMILY, "layers": {"blocks.0.attn.qkv": entry}})


def test_digest_of_a_rank_one_factor_cut_from_a_column_major_svd():
    """A (d, 1) factor whose last stride is not 1 is 'contiguous' to torch but refuses a byte view: digested all the same."""
    from lowrank_cli.io.manifest import tensors_digest
    from lowrank_cli.pipelines.compress import weights_digest

    odd = torch.randn(1, 5).T
    assert odd.is_contiguous() and odd.stride(-1) != 1
    same = odd.clone(memory_format=torch.contiguous_format).reshape(5, 1).clone()
    assert tensors_digest({"up": odd}) == tensors_digest({"up": same})
    assert tensors_digest({"up": odd}) != tensors_digest({"up": same + 1})
    layer = torch.nn.Linear(1, 5)
    with torch.no_grad():
        layer.weight = torch.nn.Parameter(odd.clone())
    assert weights_digest(layer) == tensors_digest(layer.state_dict())
