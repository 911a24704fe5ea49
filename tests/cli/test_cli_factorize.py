import json

import pytest
import torch
from conftest import TINY_SWIN, TINY_SWIN_KWARGS, TINY_VIT, TINY_VIT_KWARGS, manifest_of, model_args, one_line_error, tiny_vit
from safetensors import safe_open
from safetensors.torch import save_file

import lowrank_cli
from lowrank_cli.factorize import factorize_model
from lowrank_cli.io import read_header, sha256_file
from lowrank_cli.io.atomic import _umask
from lowrank_cli.nn import LowRankLinear
from lowrank_cli.recipe import load_recipe


def test_factorize_writes_manifest_and_load_matches_in_memory(cli, vit_ckpt, tmp_path):
    out = tmp_path / "vit.k3.safetensors"
    before = vit_ckpt.read_bytes()
    r = cli("factorize", vit_ckpt, "--recipe", "deit", "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--kappa", "3", "--out", out, "--json")
    assert r.code == 0, r.err
    assert vit_ckpt.read_bytes() == before  # the input is never modified
    d = json.loads(r.out)
    assert d["out"] == str(out) and d["params_after"] < d["params_before"] and d["macs_after"] < d["macs_before"]

    header = read_header(out)
    m = manifest_of(header.path)
    assert m["format_version"] == 1 and m["architecture"] == TINY_VIT
    assert m["model_kwargs"] == TINY_VIT_KWARGS
    assert m["source"] == {"file": "vit.safetensors", "sha256": sha256_file(vit_ckpt)}
    assert m["recipe"]["factorize"]["kappa"] == 3.0
    assert m["layers"]["blocks.0.attn.qkv"] == {"rank": 16, "d_in": 64, "d_out": 192, "bias": True, "rule": "kappa=3", "method": "svd"}
    assert {"blocks.0.attn.qkv.down.weight", "blocks.0.attn.qkv.up.weight", "blocks.0.attn.qkv.up.bias", "head.weight"} <= set(header.tensors)
    assert "blocks.0.attn.qkv.weight" not in header.tensors

    loaded = lowrank_cli.load(out)
    assert isinstance(loaded.blocks[0].attn.qkv, LowRankLinear) and not loaded.training
    reference = tiny_vit()
    factorize_model(reference, load_recipe("deit").with_kappa(3))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)


def test_inspect_factorized_checkpoint_shows_ranks(cli, vit_ckpt, tmp_path):
    out = tmp_path / "f.safetensors"
    assert cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out).code == 0
    r = cli("inspect", out, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["factorized_checkpoint"] is True and d["architecture"] == TINY_VIT
    ranks = {l["name"]: l["rank"] for l in d["layers"] if l["factorized"]}
    assert ranks["blocks.1.mlp.fc1"] == 25 and len(ranks) == 8
    # before/after agree with inspecting the original at the same κ
    orig = json.loads(cli("inspect", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--json").out)
    assert (d["params_before"], d["params_after"], d["macs_before"], d["macs_after"]) == (
        orig["params_before"], orig["params_after"], orig["macs_before"], orig["macs_after"])
    table = cli("inspect", out)
    assert "factorized checkpoint" in table.out and "down.weight" in table.out


def test_factorize_swin_with_recipe(cli, tmp_path):
    torch.manual_seed(0)
    import timm

    ckpt = tmp_path / "swin.safetensors"
    model = timm.create_model(TINY_SWIN, pretrained=False, **TINY_SWIN_KWARGS).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    out = tmp_path / "swin.lowrank.safetensors"
    r = cli("factorize", ckpt, "--recipe", "swin", "--model", TINY_SWIN, *model_args(TINY_SWIN_KWARGS), "--kappa", "1.2", "--out", out, "--json")
    assert r.code == 0, r.err
    layers = {l["name"]: l for l in json.loads(r.out)["layers"]}
    assert layers["layers.0.blocks.0.attn.qkv"]["factorized"]
    assert layers["layers.0.blocks.0.attn.proj"]["reason"] == "excluded by pattern 'attn.proj'"
    assert layers["layers.1.downsample.reduction"]["reason"] == "excluded by pattern 'downsample'"
    loaded = lowrank_cli.load(out)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert loaded(x).shape == (2, 10)


def test_weight_only_factorize_of_any_checkpoint(cli, tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "enc.safetensors"
    tensors = {"enc.0.dense.weight": torch.randn(64, 48), "enc.0.dense.bias": torch.randn(64), "enc.0.ln.weight": torch.ones(48)}
    save_file(tensors, str(src))
    r = cli("factorize", src, "--kappa", "2")
    assert r.code == 0, r.err
    out = tmp_path / "enc.lowrank.safetensors"  # the default output name
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        down, up = f.get_tensor("enc.0.dense.down.weight"), f.get_tensor("enc.0.dense.up.weight")
    assert keys == {"enc.0.dense.down.weight", "enc.0.dense.up.weight", "enc.0.dense.up.bias", "enc.0.ln.weight"}
    assert down.shape == (13, 48) and up.shape == (64, 13)  # floor(48·64 / (2·112)) = 13
    manifest = manifest_of(out)
    assert manifest["architecture"] is None and manifest["layers"]["enc.0.dense"]["rank"] == 13
    with pytest.raises(lowrank_cli.LowrankError, match="factorized weight-only"):
        lowrank_cli.load(out)


def test_energy_rule_sets_rank_from_spectrum(cli, vit_ckpt, tmp_path):
    recipe = tmp_path / "energy.yaml"
    recipe.write_text("factorize:\n  rank_rule: energy\n  energy: 0.5\n")
    out = tmp_path / "e.safetensors"
    r = cli("factorize", vit_ckpt, "--recipe", recipe, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out, "--json")
    assert r.code == 0, r.err
    w = tiny_vit().blocks[0].mlp.fc1.weight.detach()
    s = torch.linalg.svdvals(w.double())
    frac = torch.cumsum(s**2, 0) / (s**2).sum()
    expected = int((frac < 0.5).sum()) + 1
    assert manifest_of(out)["layers"]["blocks.0.mlp.fc1"]["rank"] == expected


def test_existing_output_refused_and_nothing_partial(cli, vit_ckpt, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    one_line_error(cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out), str(out), "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    one_line_error(cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", vit_ckpt, "--force"), "refusing to overwrite the input")
    # a failing run (checkpoint does not match) leaves no output and no temporary file behind
    out2 = tmp_path / "never.safetensors"
    one_line_error(cli("factorize", vit_ckpt, "--model", "deit_tiny_patch16_224", "--out", out2), "does not match")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.safetensors", "vit.safetensors"]
    assert cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out, "--force").code == 0
    assert manifest_of(out) is not None
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's private 0600


def test_factorize_refuses_factorized_input_and_bad_recipe(cli, vit_ckpt, tmp_path):
    out = tmp_path / "f.safetensors"
    assert cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out).code == 0
    one_line_error(cli("factorize", out, "--out", tmp_path / "g.safetensors"), "already factorized")
    one_line_error(cli("factorize", vit_ckpt, "--recipe", "nosuch"), "recipe 'nosuch'")
    one_line_error(cli("factorize"), "give a checkpoint")


def test_convert_pickle_with_weights_only(cli, tmp_path):
    pth = tmp_path / "model.pth"
    sd = tiny_vit().state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, pth)
    r = cli("convert", pth)
    assert r.code == 0, r.err
    loaded = lowrank_cli.load(tmp_path / "model.safetensors", model=TINY_VIT, **TINY_VIT_KWARGS)
    torch.testing.assert_close(loaded.state_dict()["head.weight"], sd["head.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, evil)
    one_line_error(cli("convert", evil), "cannot be loaded with weights_only=True")
    assert not (tmp_path / "evil.safetensors").exists()
