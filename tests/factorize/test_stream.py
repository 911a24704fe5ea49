"""Streamed factorization of a Hub folder (a tied Llama-style causal LM in bf16, its weights in shards): the same tensors
and manifest as the in-memory path, written in shards of the size asked, loadable, exported densely, atomic."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig

import lowrank_cli.factorize.stream as stream_module
import lowrank_cli.pipelines.factorize as factorize_pipeline
import lowrank_cli.pipelines.inspect as inspect_pipeline
from lowrank_cli import load
from lowrank_cli.errors import LowrankError
from lowrank_cli.io.manifest import read_checkpoint, tensors_digest
from lowrank_cli.io.safetensors import read_file_header, read_header
from lowrank_cli.pipelines.export import export_checkpoint
from lowrank_cli.pipelines.factorize import factorize_checkpoint, streamable
from lowrank_cli.pipelines.inspect import inspect_checkpoint
from lowrank_cli.recipe import EmbeddingsConfig, load_recipe

from conftest import one_line_error
from hf_models import _byte_bpe, hub_model


def _recipe(**factorize):
    """The causal-lm recipe with plain SVD at uniform ranks (what is streamed), and any other factorize settings."""
    recipe = load_recipe("causal-lm")
    return recipe.model_copy(update={"factorize": recipe.factorize.model_copy(update={"method": "svd", "allocation": "uniform", **factorize})})


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory) -> Path:
    """A Llama-style causal LM with its LM head tied to its embeddings, grouped-query attention, in bf16, in 3+ shards."""
    folder = tmp_path_factory.mktemp("src") / "tiny-llama"
    tokenizer = _byte_bpe(folder)
    config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(str(folder), max_shard_size="60KB")
    tokenizer.save_pretrained(str(folder))
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder


def _in_memory(monkeypatch, source, recipe, out, **kw):
    """The in-memory path's output for the same call: the model loaded whole, factorized in place, its state dict written."""
    with monkeypatch.context() as m:
        m.setattr(factorize_pipeline, "streamable", lambda *a: None)
        return factorize_checkpoint(source, recipe, out, **kw)


def _tensors(folder):
    return read_checkpoint(folder)[2]


DATA_AWARE = {"method": "whitened", "calib_data": "pydoc", "calib_samples": 6, "calib_batch_size": 4}


@pytest.mark.parametrize("factorize", [{}, {"rank_rule": "energy", "energy": 0.9}, {"embeddings": EmbeddingsConfig(kappa=2)}, DATA_AWARE,
                                       {**DATA_AWARE, "method": "asvd", "rank_rule": "energy", "energy": 0.9}],
                         ids=["kappa", "energy", "embeddings", "whitened", "asvd-energy"])
def test_streamed_output_is_the_in_memory_one(bf16_folder, tmp_path, monkeypatch, factorize):
    recipe = _recipe(**factorize)
    assert streamable(read_header(bf16_folder), None, {}, recipe) is not None
    streamed = factorize_checkpoint(bf16_folder, recipe, tmp_path / "streamed")
    reference = _in_memory(monkeypatch, bf16_folder, recipe, tmp_path / "memory")
    got, want = _tensors(streamed.out), _tensors(reference.out)
    assert list(got) == list(want)
    assert all(got[k].dtype == torch.bfloat16 for k in got), {k: got[k].dtype for k in got}
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert streamed.manifest.to_dict() == reference.manifest.to_dict()  # weights_sha256 included: the same tensors
    assert streamed.inspection.to_dict() == reference.inspection.to_dict()  # plans, parameters, MACs
    assert sorted(p.name for p in streamed.out.iterdir()) == sorted(p.name for p in reference.out.iterdir())


def test_small_shards_come_with_an_index_and_load(bf16_folder, tmp_path, monkeypatch, cli):
    out = tmp_path / "sharded"
    (tmp_path / "svd.yaml").write_text("name: svd\nselect: {exclude: [lm_head]}\nfactorize: {kappa: 2, method: svd}\n")
    r = cli("factorize", bf16_folder, "--recipe", tmp_path / "svd.yaml", "--out", out, "--max-shard-size", "40KB", "--json")
    assert r.code == 0, r.err
    recipe = _recipe()
    result = factorize_checkpoint(bf16_folder, recipe, out, force=True, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards and not list(out.glob(".*"))
    for shard in shards:  # at most 40 kB of tensors, or one larger tensor alone
        sizes = [t.numel * 2 for t in read_file_header(out / shard).tensors.values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(out).values())
    assert json.loads(index["metadata"]["lowrank"])["weights_sha256"] == result.manifest.weights_sha256 == tensors_digest(_tensors(out))
    one = _in_memory(monkeypatch, bf16_folder, recipe, tmp_path / "one")
    assert (one.out / "model.safetensors").exists()  # 5GB by default: one file
    ids = {"input_ids": torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(1))}
    model, reference = load(out), load(one.out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reference(**ids).logits)
    dense = export_checkpoint(out, "dense", tmp_path / "dense", max_shard_size="100KB")
    hf = transformers.AutoModelForCausalLM.from_pretrained(dense.out)
    with torch.no_grad():
        a, b = hf(**ids).logits.float(), model(**ids).logits.float()
    assert (a - b).abs().max() <= 3e-2 * b.abs().max()


@pytest.mark.parametrize("bad", ["5XB", "MB", "0MB", "-3", "1.5GB"])
def test_a_shard_size_that_is_not_a_size_is_refused(bf16_folder, tmp_path, cli, bad):
    with pytest.raises(LowrankError, match="max_shard_size .* is not a size; accepted") as e:
        factorize_checkpoint(bf16_folder, _recipe(), tmp_path / "x", max_shard_size=bad)
    assert e.value.param == "max_shard_size"
    r = cli("factorize", bf16_folder, "--recipe", "causal-lm", "--out", tmp_path / "y", "--max-shard-size", bad)
    one_line_error(r, "--max-shard-size", "is not a size")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_mid_way_leaves_nothing(bf16_folder, tmp_path, monkeypatch):
    calls = []
    real = stream_module.svd

    def failing(weight, device=None):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(weight, device)

    monkeypatch.setattr(stream_module, "svd", failing)
    with pytest.raises(KeyboardInterrupt):
        factorize_checkpoint(bf16_folder, _recipe(), tmp_path / "out", max_shard_size="20KB")
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []


def test_what_streaming_does_not_take_goes_in_memory(bf16_folder, tmp_path):
    header = read_header(bf16_folder)
    assert streamable(header, None, {}, _recipe(rank_rule="budget", target_params=0.5)) is None  # ranks decided across layers
    assert streamable(header, None, {}, load_recipe("causal-lm")) is None  # the recipe's sensitivity allocation: a whole backward pass
    assert streamable(header, None, {}, _recipe(method="whitened")) is not None  # whitened at uniform ranks: block by block
    assert streamable(header, None, {}, _recipe(method="whitened", embeddings=EmbeddingsConfig(kappa=2))) is None
    assert streamable(header, None, {}, _recipe(method="whitened", allocation="sensitivity")) is None  # one backward pass, whole
    every = _recipe(method="whitened")
    every.select.exclude = []  # the LM head too (tied: dense); a layer outside the blocks is calibrated in memory
    assert streamable(header, None, {}, every) is not None
    assert streamable(header, None, {"dtype": "float32"}, _recipe()) is None  # loaded in another dtype than stored
    assert streamable(header, None, {"intermediate_size": 96}, _recipe()) is None  # shapes that do not fit: the loader says which


@pytest.mark.parametrize("factorize", [{}, {"rank_rule": "energy", "energy": 0.9}], ids=["kappa", "energy"])
def test_inspect_of_a_folder_reads_headers_only(bf16_folder, monkeypatch, factorize):
    recipe = _recipe(**factorize)
    with monkeypatch.context() as m:
        m.setattr(inspect_pipeline, "hub_skeleton", lambda *a: None)
        loaded = inspect_checkpoint(bf16_folder, recipe)  # the model loaded whole by transformers
    family = type(streamable(read_header(bf16_folder), None, {}, recipe).built.family)

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(family, "load_pretrained", refuse)
    monkeypatch.setattr(family, "load_dense", refuse)
    assert inspect_checkpoint(bf16_folder, recipe).to_dict() == loaded.to_dict()  # plans (spectra read one weight at a time), MACs


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_gpt2_transposed_conv1d_streams_too(tmp_path, monkeypatch, method):
    source = hub_model(tmp_path, "gpt2")  # fp32, one file, Conv1D weights stored (d_in, d_out), LM head tied
    recipe = _recipe(**({**DATA_AWARE, "method": method} if method != "svd" else {}))
    assert streamable(read_header(source), None, {}, recipe) is not None
    streamed = factorize_checkpoint(source, recipe, tmp_path / "streamed")
    reference = _in_memory(monkeypatch, source, recipe, tmp_path / "memory")
    got, want = _tensors(streamed.out), _tensors(reference.out)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert streamed.manifest.to_dict() == reference.manifest.to_dict() and len(streamed.manifest.layers) == 8
