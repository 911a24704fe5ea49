"""A causal LM's ONNX export with a KV cache (`lowrank_cli/export/onnx_cache.py`): a tiny Llama (grouped-query attention,
tied head, chat template) built here, factorized by the library, exported by default as the folder optimum's
ORTModelForCausalLM loads, with optimum's input and output names; greedy generation in onnxruntime (`OrtDecoder`) equal
to transformers' `generate` token for token; prefill and decode callable apart; bad input refused in one line, nothing
written. GPT-2 (its weights in `model.onnx.data`, as a model of 2 GB or more) and the export without a cache
(`--no-kv-cache`) are slow: one more export each."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from conftest import one_line_error
from hf_models import hub_model

from lowrank_cli.errors import LowrankError
from lowrank_cli.export import onnx_cache
from lowrank_cli.export.onnx_cache import OrtDecoder
from lowrank_cli.models import load
from lowrank_cli.pipelines.export import export_checkpoint
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe

OPTIMUM_INPUTS = ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
                  "past_key_values.1.key", "past_key_values.1.value"]
OPTIMUM_OUTPUTS = ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
TEXTS = ["def parse(self, value):\n    return", "Return the number of items"]


def _factorized(root, kind: str):
    """A tiny Hub model of `kind`, a few steps trained (clear margins between its logits), factorized by plain SVD."""
    recipe = load_recipe("causal-lm" if kind != "bert" else "bert")
    recipe = recipe.model_copy(update={"factorize": recipe.factorize.model_copy(update={"method": "svd", "allocation": "uniform"})})
    source = hub_model(root, kind, pretrain_steps=10 if kind != "bert" else 0)
    return source, factorize_checkpoint(source, recipe, root / f"{kind}.lowrank").out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(source folder, factorized folder, export result) of the tiny Llama, exported once with the defaults."""
    root = tmp_path_factory.mktemp("kv")
    source, fact = _factorized(root, "llama-tied")
    return source, fact, export_checkpoint(fact, "onnx")


def _prompts(folder, model):
    """Two texts of different lengths, tokenized by the folder's tokenizer and left-padded."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # one prompt is padded
    return enc["input_ids"], enc["attention_mask"], tok.pad_token_id


def test_a_causal_lm_exports_by_default_a_folder_with_optimum_names(llama):
    source, fact, result = llama
    out = fact.parent / f"{fact.name}-onnx"
    assert result.out == str(out) and result.weight_files == ["model.onnx"] and result.extra_files == []
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json", "model.onnx",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in fact.parent.iterdir()) == sorted([source.name, fact.name, out.name])  # no staging folder left
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == OPTIMUM_INPUTS and [o.name for o in session.get_outputs()] == OPTIMUM_OUTPUTS
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 8]  # 2 key/value heads of 32 / 4 features
    assert shapes["input_ids"] == shapes["position_ids"] == ["batch_size", "sequence_length"]
    v = result.verification
    assert v["passed"] and v["relative_diff"] < 1e-5 and v["shapes"] == ["1 × 7 tokens", "3 × 19 tokens"]
    assert v["greedy"]["tokens_equal"] and v["greedy"]["new_tokens"] == 32 and v["greedy"]["first_difference"] is None
    assert result.factorized_layers == 14 and result.onnx_ops["MatMul"] >= 2 * 14
    config = transformers.AutoConfig.from_pretrained(str(out))  # what ORTModelForCausalLM reads beside the graph
    assert config.model_type == "llama" and config.num_key_value_heads == 2 and config.architectures == ["LlamaForCausalLM"]
    assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id is not None
    assert (out / "chat_template.jinja").read_bytes() == (source / "chat_template.jinja").read_bytes()


def test_ort_greedy_generation_equals_transformers_generate(llama):
    _, fact, result = llama
    model = load(fact)
    ids, mask, pad = _prompts(result.out, model)
    decoder = OrtDecoder.from_path(result.out, threads=1)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32, eos_token_id=None,
                              pad_token_id=pad)
    got = decoder.generate(ids, 32, mask)
    assert got.shape == (2, ids.shape[1] + 32) and torch.equal(got, want)
    eos = int(want[0, ids.shape[1] + 4])  # an end token the first sequence reaches at its fifth new token
    with torch.no_grad():
        want_eos = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32, eos_token_id=eos,
                                  pad_token_id=pad)
    got_eos = decoder.generate(ids, 32, mask, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(got_eos, want_eos) and (got_eos[0, ids.shape[1] + 5:] == pad).all()


def test_prefill_and_decode_are_separate_calls(llama):
    _, fact, result = llama
    model = load(fact)
    ids, mask, _ = _prompts(result.out, model)
    decoder = OrtDecoder.from_path(result.out)
    logits, past = decoder.prefill(ids, mask)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
    assert logits.shape == want.shape and (logits - want).abs().max() <= 5e-4 * want.abs().max()
    assert past.length == ids.shape[1] and past.tensors[0].shape == (2, 2, ids.shape[1], 8) and len(past.tensors) == 4
    token = logits.argmax(-1, keepdim=True)
    step_logits, grown = decoder.decode(token, past)
    whole, whole_mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    with torch.no_grad():
        want_step = model(input_ids=whole, attention_mask=whole_mask, use_cache=False).logits[:, -1]
    assert (step_logits - want_step).abs().max() <= 5e-4 * want_step.abs().max()
    assert grown.length == ids.shape[1] + 1 and np.array_equal(grown.attention_mask, whole_mask.numpy())
    assert torch.equal(decoder.step(token, past)[0], step_logits)  # `step`: the name models.generation's decoders use
    with pytest.raises(LowrankError, match=r"does not cover the \d+ past and 1 new tokens"):
        decoder.decode(token, past, attention_mask=mask)  # the past's mask, without the new token


def test_bad_requests_are_refused_in_one_line_and_write_nothing(cli, llama, tmp_path):
    _, fact, result = llama
    root = tmp_path / "bert"
    root.mkdir()
    _, bert = _factorized(root, "bert")
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(cli("export", bert, "--format", "onnx", "--kv-cache", "--out", tmp_path / "bert-onnx"),
                   "--kv-cache", "does not generate text", "causal LMs only", "accepted here: kv_cache false or unset")
    with pytest.raises(LowrankError, match="kv_cache: .* holds a features model"):
        export_checkpoint(bert, "onnx", tmp_path / "b.onnx", kv_cache=True)
    one_line_error(cli("export", fact, "--format", "onnx", "--kv-cache", "--out", tmp_path / "m.onnx"),
                   "--out", "m.onnx", "is a folder", "ORTModelForCausalLM", "kv_cache false")
    one_line_error(cli("export", fact, "--format", "dense", "--no-kv-cache", "--out", tmp_path / "d"),
                   "--kv-cache applies to the onnx format only, not dense")
    one_line_error(cli("export", fact, "--format", "onnx", "--out", result.out), result.out, "exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(LowrankError, match="no such ONNX file"):
        OrtDecoder.from_path(tmp_path)


@pytest.mark.slow
def test_a_onnx_file_asked_for_is_the_single_graph_without_a_cache(cli, llama, tmp_path):
    _, fact, _ = llama
    out = tmp_path / "m.onnx"
    r = cli("export", fact, "--format", "onnx", "--out", out, "--json")  # as --no-kv-cache: a .onnx file is one graph
    assert r.code == 0, r.err
    assert json.loads(r.out)["verification"]["relative_diff"] < 1e-5 and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    with pytest.raises(LowrankError, match="not a decoder with a KV cache in optimum's layout"):
        OrtDecoder(session)


@pytest.mark.slow
def test_gpt2_exports_with_its_cache_too_and_its_weights_outside_the_graph(cli, tmp_path, monkeypatch):
    _, fact = _factorized(tmp_path, "gpt2")
    monkeypatch.setattr(onnx_cache, "EXTERNAL_DATA_BYTES", 0)  # as a model of 2 GB or more: the weights in model.onnx.data
    r = cli("export", fact, "--format", "onnx", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    out = tmp_path / "gpt2.lowrank-onnx"
    assert d["out"] == str(out) and d["verification"]["greedy"]["tokens_equal"]
    assert d["weight_files"] == ["model.onnx", "model.onnx.data"]
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert d["bytes_after"] == sum((out / f).stat().st_size for f in d["weight_files"])
    decoder = OrtDecoder.from_path(d["out"])
    assert decoder.past_names == [f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    ids = torch.randint(5, 300, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load(fact).generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                   eos_token_id=None, pad_token_id=0)
    assert torch.equal(decoder.generate(ids, 20), want)  # batch 3, no mask given: all ones
