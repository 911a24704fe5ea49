import json
import struct

import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS, model_args, one_line_error
from safetensors.torch import save_file


def test_inspect_architecture_without_checkpoint_json(cli):
    r = cli("inspect", "--model", "deit_base_patch16_224", "--kappa", "2", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)  # stdout is one JSON object and nothing else
    assert round(d["params_before"] / 1e6, 1) == 86.6 and round(d["params_after"] / 1e6, 1) == 44.1
    assert round(d["macs_before"] / 1e9, 1) == 17.6
    qkv = next(l for l in d["layers"] if l["name"] == "blocks.0.attn.qkv")
    assert qkv == {**qkv, "shape": [2304, 768], "factorized": True, "rank": 288,
                   "params_before": 768 * 2304 + 2304, "params_after": 288 * 3072 + 2304, "reason": None}
    head = next(l for l in d["layers"] if l["name"] == "head")
    assert head["factorized"] is False and head["reason"] == "excluded by pattern 'head'"


def test_inspect_checkpoint_with_model_table(cli, vit_ckpt):
    r = cli("inspect", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS))
    assert r.code == 0, r.err
    assert "blocks.0.attn.qkv" in r.out and "MACs / image" in r.out and "8 of 9 linear layers factorized" in r.out


def test_inspect_infers_num_classes_from_head(cli, vit_ckpt):
    kwargs = {k: v for k, v in TINY_VIT_KWARGS.items() if k != "num_classes"}
    r = cli("inspect", vit_ckpt, "--model", TINY_VIT, *model_args(kwargs), "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["model_kwargs"]["num_classes"] == 10


def test_inspect_weight_only_any_safetensors(cli, tmp_path):
    # a BERT-like checkpoint: no timm architecture, an embedding table, linears and norms
    torch.manual_seed(0)
    path = tmp_path / "bert.safetensors"
    save_file({
        "bert.embeddings.word_embeddings.weight": torch.randn(100, 32),
        "bert.encoder.layer.0.attention.self.query.weight": torch.randn(32, 32),
        "bert.encoder.layer.0.attention.self.query.bias": torch.randn(32),
        "bert.encoder.layer.0.intermediate.dense.weight": torch.randn(128, 32),
        "bert.encoder.layer.0.output.LayerNorm.weight": torch.randn(32),
        "classifier.weight": torch.randn(2, 32),
        "bert.embeddings.position_ids": torch.arange(16).unsqueeze(0),  # an int64 buffer: no parameter
    }, str(path))
    r = cli("inspect", path, "--json", "--spectrum")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    layers = {l["name"]: l for l in d["layers"]}
    assert d["macs_before"] is None and d["macs_after"] is None
    assert layers["bert.encoder.layer.0.intermediate.dense"]["rank"] == 12  # floor(32·128 / (2·160))
    assert 0 < layers["bert.encoder.layer.0.intermediate.dense"]["energy_kept"] < 1
    assert "bert.embeddings.word_embeddings" not in layers  # an embedding table is not a linear layer
    assert "fewer than 10 outputs" in layers["classifier"]["reason"]
    assert layers["bert.encoder.layer.0.attention.self.query"]["rank"] == 8  # 32x32 at κ=2
    assert d["params_before"] == 100 * 32 + 32 * 32 + 32 + 128 * 32 + 32 + 64
    assert d["params_after"] == d["params_before"] - sum(l["params_before"] - l["params_after"] for l in d["layers"])
    ids = next(t for t in d["tensors"] if t["name"] == "bert.embeddings.position_ids")
    assert ids["buffer"] is True and ids["params"] == 0
    assert sum(t["params"] for t in d["tensors"]) == d["params_before"]  # the table and the totals agree
    r = cli("inspect", path)
    assert "2 of 3 linear layers factorized" in r.out and "not a parameter" in r.out


def test_inspect_spectrum_energy_at_rank(cli):
    r = cli("inspect", "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--spectrum", "--json")
    d = json.loads(r.out)
    energies = [l["energy_kept"] for l in d["layers"] if l["factorized"]]
    assert energies and all(0 < e < 1 for e in energies)
    r = cli("inspect", "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--spectrum")
    assert "energy kept" in r.out


def test_bad_inputs(cli, tmp_path, vit_ckpt):
    missing = tmp_path / "nope.safetensors"
    one_line_error(cli("inspect", missing), str(missing), "no such file")

    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is text and not a checkpoint at all")
    one_line_error(cli("inspect", text), str(text), "not a safetensors file")

    rnd = tmp_path / "random.bin"
    rnd.write_bytes(bytes(range(7, 250)) * 40)
    one_line_error(cli("inspect", rnd), "not a safetensors file")

    pth = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(3)}, pth)
    one_line_error(cli("inspect", pth), "PyTorch pickle", "lowrank convert")

    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(vit_ckpt.read_bytes()[:-1000])
    one_line_error(cli("inspect", truncated), "truncated")

    badjson = tmp_path / "badjson.safetensors"
    header = b"{not json at all"
    badjson.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    one_line_error(cli("inspect", badjson), "header is not valid JSON")

    one_line_error(cli("inspect", "--model", "deit_bse_patch16_224"), "unknown timm architecture 'deit_bse_patch16_224'", "did you mean")
    one_line_error(cli("inspect", vit_ckpt, "--model", "deit_tiny_patch16_224"), "does not match architecture 'deit_tiny_patch16_224'", "shape mismatches")
    one_line_error(cli("inspect", "--model", TINY_VIT, "--kappa", "-1"), "'--kappa'", "must be a finite number > 1", code=2)
    one_line_error(cli("inspect", "--model", TINY_VIT, "--kappa", "abc"), "Invalid value for '--kappa'", code=2)
    bad_recipe = tmp_path / "r.yaml"
    bad_recipe.write_text("selekt: {}\n")
    one_line_error(cli("inspect", "--model", TINY_VIT, "--recipe", bad_recipe), str(bad_recipe), "unknown key 'selekt'", "did you mean 'select'")
    one_line_error(cli("inspect", "--model", TINY_VIT, "--model-arg", "depth"), "expected KEY=VALUE")
    one_line_error(cli("inspect", "--model", TINY_VIT, "--model-arg", "bogus=1"), "does not accept")
