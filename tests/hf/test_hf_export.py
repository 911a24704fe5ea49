"""A tied causal LM (grouped-query attention, chat template) through factorize and dense export: its table stored once,
its tie restored, its side files carried; dense Hub exports in fp16/bf16 and in shards."""

import json

import pytest
import torch
import transformers
from hf_models import CHAT_TEMPLATE, hub_model

from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.model import factorize_model
from lowrank_cli.io.manifest import read_checkpoint
from lowrank_cli.io.safetensors import read_header
from lowrank_cli.models import build_model, load
from lowrank_cli.models.build import load_state_dict_strict
from lowrank_cli.pipelines.export import export_checkpoint
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe

def _svd_recipe():
    """The causal-lm recipe with plain SVD: what is checked here is storage, not the factors' method."""
    recipe = load_recipe("causal-lm")
    return recipe.model_copy(update={"factorize": recipe.factorize.model_copy(update={"method": "svd", "allocation": "uniform"})})


SIDE = ("chat_template.jinja", "generation_config.json", "tokenizer_config.json", "tokenizer.json")
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    source = hub_model(root, "llama-tied")
    return source, factorize_checkpoint(source, _svd_recipe(), root / "llama-tied.lowrank").out


def _ids(n: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 300, (n, length), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_a_tied_table_is_stored_once_and_tied_again_on_load(tied):
    source, fact = tied
    config = json.loads((fact / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    in_memory = build_model(source)
    factorize_model(in_memory.model, _svd_recipe(), family=in_memory.family)
    expected = in_memory.model.state_dict()
    stored = read_header(fact / "model.safetensors").tensors
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored  # one copy of the tied table
    assert set(stored) == set(expected) - {"lm_head.weight"}
    model = load(fact)  # strict
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie, restored
    got = model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    again = build_model(fact).model  # a resumed run's strict load of the file's tensors alone (no adapt_state_dict)
    torch.nn.init.zeros_(again.lm_head.weight)
    load_state_dict_strict(again, read_checkpoint(fact / "model.safetensors")[2], fact, "LlamaForCausalLM")
    assert again.lm_head.weight is again.model.embed_tokens.weight and torch.equal(again.lm_head.weight, expected["lm_head.weight"])
    for name in SIDE:  # the chat template and the usage files come along
        assert (fact / name).read_bytes() == (source / name).read_bytes(), name


def test_dense_export_of_the_tied_model_loads_in_transformers(tied, tmp_path):
    source, fact = tied
    res = export_checkpoint(fact, "dense", tmp_path / "dense")
    out = tmp_path / "dense"
    assert res.weight_files == ["model.safetensors"] and res.bytes_after == (out / "model.safetensors").stat().st_size
    assert res.dtype == "float32" and res.verification["tolerance"] == 5e-4 and res.verification["relative_diff"] < 1e-5
    assert "lm_head.weight" not in read_header(out / "model.safetensors").tensors
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert type(dense).__name__ == "LlamaForCausalLM" and dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()
    factorized = load(fact)
    with torch.no_grad():
        a, b = dense(**_ids()).logits, factorized(**_ids()).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    for name in SIDE:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == "<|user|>hi\n<|assistant|>hello\n"
    assert tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("dtype,code", [("float16", "F16"), ("bfloat16", "BF16")])
def test_dense_hub_export_in_half_precision(tied, tmp_path, dtype, code):
    _, fact = tied
    out = tmp_path / dtype
    res = export_checkpoint(fact, "dense", out, dtype=dtype)
    assert res.dtype == dtype and {t.dtype for t in read_header(out / "model.safetensors").tensors.values()} == {code}
    config = json.loads((out / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == dtype
    v = res.verification
    assert v["loaded_dtypes"] == [dtype] and v["tolerance"] == 3e-2 and v["min_top1_agreement"] == 0.99 and v["top1_agreement"] == 1.0
    assert 0 < v["relative_diff"] <= 3e-2
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert dense.dtype == getattr(torch, dtype)


def test_dense_hub_export_in_shards(cli, tied, tmp_path):
    _, fact = tied
    out = tmp_path / "sharded"
    r = cli("export", fact, "--format", "dense", "--out", out, "--max-shard-size", "40000", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and res["weight_files"] == shards and not (out / "model.safetensors").exists()
    assert res["bytes_after"] == sum((out / s).stat().st_size for s in shards)
    assert res["verification"]["relative_diff"] < 1e-5 and set(index["weight_map"]) == set(read_header(out).tensors)
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        a, b = dense(**_ids()).logits, load(fact)(**_ids()).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    for bad in ("5XB", "MB", 0, -3):
        with pytest.raises(LowrankError, match="max_shard_size .* is not a size; accepted") as e:
            export_checkpoint(fact, "dense", tmp_path / "bad", max_shard_size=bad)
        assert e.value.param == "max_shard_size"
    with pytest.raises(LowrankError, match="max_shard_size applies to the dense format only, not onnx"):
        export_checkpoint(fact, "onnx", tmp_path / "x.onnx", max_shard_size="1MB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]
