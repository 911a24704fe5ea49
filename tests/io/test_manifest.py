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


def _write(tmp_path, manifest_json: str):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={MANIFEST_KEY: manifest_json})
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
