"""transformers models through the whole pipeline: BERT, RoBERTa, DistilBERT, GPT-2 (Conv1D), Llama, with real tokenizers."""

import json
import math

import pytest
import torch
import transformers
from conftest import manifest_of, one_line_error
from hf_models import hub_model

from lowrank_cli.io import read_header
from lowrank_cli.models import build_model, load
from lowrank_cli.nn import LowRankEmbedding, LowRankLinear


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {kind: hub_model(root, kind) for kind in ("bert", "bert-cls", "distilbert", "roberta", "gpt2", "llama")}


@pytest.mark.parametrize("kind,linears,recipe", [
    ("bert", 12, "bert"), ("bert-cls", 12, "bert"), ("distilbert", 12, "bert"), ("roberta", 12, "bert"),
    ("gpt2", 8, "causal-lm"), ("llama", 14, "causal-lm"),
])
def test_inspect_counts_like_transformers(cli, hub, kind, linears, recipe):
    r = cli("inspect", hub[kind], "--recipe", recipe, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    reference = getattr(transformers, d["architecture"]).from_pretrained(str(hub[kind]))
    assert d["architecture_source"] == "config.json" and d["params_before"] == reference.num_parameters()
    assert sum(l["factorized"] for l in d["layers"]) == linears
    assert all("embed" not in l["name"] and "wte" not in l["name"] for l in d["layers"])  # tables are not linear layers
    assert d["seq_len"] == 64 and 0 < d["macs_after"] < d["macs_before"]
    dense = {l["name"]: l["reason"] for l in d["layers"] if not l["factorized"]}
    if kind == "bert":
        assert dense == {"pooler.dense": "excluded by pattern 'pooler'"}
    if kind == "gpt2":
        assert "tied to 'transformer.wte'" in dense["lm_head"]


@pytest.mark.parametrize("kind,recipe", [("bert", "bert"), ("gpt2", "causal-lm"), ("llama", "causal-lm")])
def test_factorize_writes_a_hub_folder_that_loads_strictly(cli, hub, tmp_path, kind, recipe):
    out = tmp_path / f"{kind}.lowrank"
    r = cli("factorize", hub[kind], "--recipe", recipe, "--out", out, "--json")
    assert r.code == 0, r.err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    m = manifest_of(out / "model.safetensors")
    assert m["family"] == "transformers" and m["model_kwargs"]["model_type"] in ("bert", "gpt2", "llama")
    if kind == "gpt2":
        assert {e.get("kind") for e in m["layers"].values()} == {"conv1d"}
    model = load(out)
    assert isinstance(model, transformers.PreTrainedModel) and sum(isinstance(x, LowRankLinear) for x in model.modules()) == len(m["layers"])
    dense = build_model(hub[kind])
    ids = {"input_ids": torch.randint(5, 300, (2, 11)), "attention_mask": torch.ones(2, 11, dtype=torch.long)}
    with torch.no_grad():
        a, b = dense.family.forward(dense.model, ids), dense.family.forward(model, ids)
    assert a.shape == b.shape and 0 < (a - b).abs().max() < 10 * a.abs().max()  # close, not equal: rank-limited


def test_conv1d_is_factorized_through_its_transposed_weight(hub):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # GPT-2's layout: weight (d_in = 32, d_out = 48)
    low = LowRankLinear.from_linear(conv, 32)  # full rank: exact
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(low(x), conv(x), rtol=1e-4, atol=1e-5)
    low8 = LowRankLinear.from_linear(conv, 8)
    U, S, Vh = torch.linalg.svd(conv.weight.detach().T.double(), full_matrices=False)
    best = (U[:, :8] * S[:8]) @ Vh[:8]
    assert torch.linalg.norm(low8.up.weight.double() @ low8.down.weight.double() - best) / torch.linalg.norm(best) < 1e-5


def test_factorized_embeddings_are_recorded_loaded_and_exported(cli, hub, tmp_path):
    recipe = tmp_path / "emb.yaml"
    recipe.write_text("select:\n  exclude: [pooler]\nfactorize:\n  kappa: 2\n  embeddings: {kappa: 2}\n")
    out = tmp_path / "emb"
    r = cli("factorize", hub["bert"], "--recipe", recipe, "--out", out, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    table = next(l for l in d["layers"] if l["name"] == "embeddings.word_embeddings")
    vocab = read_header(hub["bert"] / "model.safetensors").tensors["embeddings.word_embeddings.weight"].shape[0]
    rank = math.floor(vocab * 32 / (2 * (vocab + 32)))  # κ = 2 on a V × 32 table: V·d / (κ(V + d))
    assert table["factorized"] and table["kind"] == "embedding" and table["rank"] == rank
    assert read_header(out / "model.safetensors").tensors["embeddings.word_embeddings.lookup.weight"].shape == (vocab, rank)
    assert manifest_of(out / "model.safetensors")["layers"]["embeddings.word_embeddings"]["kind"] == "embedding"
    model = load(out)
    assert isinstance(model.embeddings.word_embeddings, LowRankEmbedding)
    assert not isinstance(model.embeddings.position_embeddings, LowRankEmbedding)  # not in factorize.embeddings.include
    r = cli("export", out, "--format", "dense", "--out", tmp_path / "dense", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["verification"]["max_abs_diff"] < 1e-4
    reloaded = transformers.BertModel.from_pretrained(str(tmp_path / "dense"))
    assert reloaded.embeddings.word_embeddings.weight.shape == (len(transformers.AutoTokenizer.from_pretrained(str(hub["bert"]))), 32)
    g = cli("inspect", hub["gpt2"], "--recipe", recipe, "--json")  # GPT-2's tied word embeddings stay dense
    wte = next(l for l in json.loads(g.out)["layers"] if l["name"] == "transformer.wte")
    assert not wte["factorized"] and "tied to 'lm_head'" in wte["reason"]


def test_a_sharded_checkpoint_with_its_index(cli, hub, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(hub["bert"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in parts.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    r = cli("inspect", folder, "--recipe", "bert", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["params_before"] == build_model(hub["bert"]).model.num_parameters()
    assert build_model(folder).architecture == "BertModel"
    (folder / "model-00002-of-00002.safetensors").unlink()
    one_line_error(cli("inspect", folder), "shard 'model-00002-of-00002.safetensors' is missing from the folder")


def test_hugging_face_vit_on_images(cli, tmp_path):
    folder = hub_model(tmp_path, "vit")
    r = cli("inspect", folder, "--recipe", "hf-vit", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["architecture"] == "ViTForImageClassification" and sum(l["factorized"] for l in d["layers"]) == 12 and d["seq_len"] is None
    assert {l["name"] for l in d["layers"] if not l["factorized"]} == {"classifier"}
    recipe = tmp_path / "v.yaml"
    recipe.write_text("select: {exclude: [classifier, pooler]}\ndata: {source: digits, num_workers: 0}\n"
                      "distill: {epochs: 1, batch_size: 64, lr: 0.001, warmup_epochs: 0}\n")
    r = cli("compress", folder, "--recipe", recipe, "--out", tmp_path / "run", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["task"] == "image-classification" and rep["train"]["base_loss"] == "ce" and rep["accuracy"]["distilled"]["examples"] == 360
    r = cli("export", tmp_path / "run", "--format", "onnx", "--out", tmp_path / "vit.onnx", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["verification"]["max_abs_diff"] < 1e-4
