"""Generation with a KV cache (`models.generation`) and `lowrank bench --generate`: the tokens equal transformers' own
`generate`, the ideal is the ratio of weight bytes read per token, the cache and memory are accounted, bad input refused.
Structure and arithmetic only, never wall-clock thresholds."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_line_error
from hf_models import hub_model

from lowrank_cli.errors import LowrankError
from lowrank_cli.measure.generation import time_generation, weight_bytes_per_token
from lowrank_cli.models import load
from lowrank_cli.models.family import get_family
from lowrank_cli.models.generation import CachedDecoder, cache_bytes, greedy
from lowrank_cli.pipelines.bench import GenerationSettings, _compiled, bench_generation
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe


def _svd_recipe():
    recipe = load_recipe("causal-lm")
    return recipe.model_copy(update={"factorize": recipe.factorize.model_copy(update={"method": "svd", "allocation": "uniform"})})


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(dense folder, factorized folder) of a tiny tied Llama (4 heads, 2 key/value heads)."""
    root = tmp_path_factory.mktemp("gen")
    source = hub_model(root, "llama-tied")
    return source, factorize_checkpoint(source, _svd_recipe(), root / "llama-tied.lowrank").out


def _prompt(batch: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 300, (batch, length), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def test_greedy_with_the_cache_equals_transformers_generate(lm):
    source, fact = lm
    for model in (load(source / "model.safetensors"), load(fact / "model.safetensors")):
        ids, mask = _prompt()
        ours = greedy(get_family("transformers").decoder(model), ids, mask, 12)
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
        assert torch.equal(ours, want)


def test_the_cache_holds_keys_and_values_of_every_position(lm):
    model = load(lm[1] / "model.safetensors")
    decoder = CachedDecoder(model)
    ids, mask = _prompt(batch=3, length=5)
    logits, state = decoder.prefill(ids, mask)
    for _ in range(4):
        logits, state = decoder.step(logits.argmax(-1, keepdim=True), state)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    # keys and values, per layer: batch × kv heads × (5 prompt + 4 new positions) × head_dim, fp32
    assert decoder.state_bytes(state) == cache_bytes(state[0]) == 2 * c.num_hidden_layers * 3 * c.num_key_value_heads * 9 * head_dim * 4
    assert state[1].shape == (3, 9)


def test_weight_bytes_per_token_reads_a_tied_table_whole_and_an_untied_one_by_row(tmp_path):
    tied = load(hub_model(tmp_path, "llama-tied") / "model.safetensors")
    untied = load(hub_model(tmp_path, "llama") / "model.safetensors")
    for model, table_whole in ((tied, True), (untied, False)):
        table = model.get_input_embeddings().weight
        params = {id(p): p for p in model.parameters()}.values()
        total = sum(p.numel() * 4 for p in params)
        want = total if table_whole else total - table.numel() * 4 + table.shape[1] * 4
        assert weight_bytes_per_token(model) == want


def test_time_generation_times_each_decoder_interleaved(lm):
    model = load(lm[1] / "model.safetensors")
    calls = []

    class Counting(CachedDecoder):
        def step(self, tokens, state):
            calls.append(self.name)
            return super().step(tokens, state)

    a, b = Counting(model), Counting(model)
    a.name, b.name = "a", "b"
    ids, mask = _prompt()
    t = time_generation({"a": a, "b": b}, ids, mask, 5, warmup=1, repeats=2)
    assert calls == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4  # warm-up, then the order alternates
    for g in t.values():
        assert (g.batch, g.prompt_len, g.new_tokens, g.decode.runs) == (2, 7, 5, 2)
        assert 0 < g.prefill.median_s <= g.ttft.median_s
        assert g.decode_tokens_per_s == pytest.approx(2 / g.decode.median_s)
        assert g.prefill_tokens_per_s == pytest.approx(14 / g.prefill.median_s)
    with pytest.raises(ValueError, match="at least 2"):
        time_generation({"a": a}, ids, mask, 1)


def test_bench_generate_json_ideals_and_memory(cli, lm):
    source, fact = lm
    r = cli("bench", fact, "--generate", "4", "--batch", "2", "--prompt-len", "6", "--threads", "1", "--repeats", "2",
            "--baseline", source / "model.safetensors", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    factorized, dense = load(fact / "model.safetensors"), load(source / "model.safetensors")
    assert d["bytes_per_token_factorized"] == weight_bytes_per_token(factorized)
    assert d["bytes_per_token_dense"] == weight_bytes_per_token(dense)
    assert d["ideal_decode_speedup"] == pytest.approx(d["bytes_per_token_dense"] / d["bytes_per_token_factorized"])
    assert d["ideal_prefill_speedup"] == pytest.approx(d["prefill_macs_dense"] / d["prefill_macs_factorized"])
    assert d["prefill_macs_dense"] > d["prefill_macs_factorized"] > 0
    assert [row["batch"] for row in d["rows"]] == [1, 2]
    for row in d["rows"]:
        assert row["decode_speedup"] == pytest.approx(row["dense"]["decode"]["median_s"] / row["factorized"]["decode"]["median_s"])
        assert row["decode_efficiency"] == pytest.approx(row["decode_speedup"] / d["ideal_decode_speedup"])
        assert row["prefill_efficiency"] == pytest.approx(row["prefill_speedup"] / d["ideal_prefill_speedup"])
    c = factorized.config
    kv = 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * (6 + 3) * (c.hidden_size // c.num_attention_heads) * 4
    for name, model in (("factorized", factorized), ("dense", dense)):
        m = d["memory"][name]
        assert m["weights"] == sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
        assert m["kv_cache"] == kv
        assert m["peak"] >= m["after_imports"] > 0 and m["added"] == m["peak"] - m["after_imports"]


def test_compiled_models_generate_the_same_tokens(lm):
    model = load(lm[1] / "model.safetensors")
    ids, mask = _prompt()
    want = greedy(CachedDecoder(model), ids, mask, 6)
    assert torch.equal(greedy(CachedDecoder(_compiled(model, "eager")), ids, mask, 6), want)  # dynamo's graphs, run eagerly: seconds


def test_bench_generate_refuses_what_does_not_generate(cli, lm, tmp_path):
    source, fact = lm
    bert = factorize_checkpoint(hub_model(tmp_path, "bert"), load_recipe("bert"), tmp_path / "bert.lowrank").out
    one_line_error(cli("bench", bert, "--generate", "4", "--no-memory"), "does not generate", "causal LMs")
    one_line_error(cli("bench", fact, "--generate", "58", "--prompt-len", "8", "--no-memory"), "prompt_len 8 + generate 58", "65 positions", "maximum of 64")
    one_line_error(cli("bench", fact, "--compile"), "apply with --generate")
    one_line_error(cli("bench", fact, "--no-memory"), "apply with --generate")
    one_line_error(cli("bench", fact, "--generate", "4", "--layers"), "--prompt-len")
    with pytest.raises(LowrankError, match="accepted: torch, onnxruntime"):
        bench_generation(fact, settings=GenerationSettings(new_tokens=4, runtime="tensorrt", memory=False))


@pytest.mark.slow
def test_bench_generate_in_onnxruntime_with_the_kv_cache(cli, lm):
    r = cli("bench", lm[1], "--generate", "4", "--batch", "2", "--prompt-len", "5", "--threads", "1", "--repeats", "1",
            "--runtime", "onnxruntime", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["runtime"] == "onnxruntime" and d["memory"] is None and any("torch runtime" in n for n in d["notes"])
    assert [row["batch"] for row in d["rows"]] == [1, 2]
    for row in d["rows"]:
        assert row["decode_efficiency"] == pytest.approx(row["decode_speedup"] / d["ideal_decode_speedup"])
        assert row["factorized"]["decode"]["runs"] == 1
    one_line_error(cli("bench", lm[1], "--generate", "4", "--runtime", "onnxruntime", "--compile"), "compile", "torch runtime")
