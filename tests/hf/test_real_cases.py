"""Issue 17's cases from real models, on the tiny checkpoints shaped like them (tests/fixtures_real.py) — those no other
test holds: a Llama-style release (bf16, sharded, grouped-query attention, tied head, chat template) whitened at κ = 1.25
and exported to ONNX and dense fp32/bf16; its chat template in the factorized, run and exported folders; `evaluate` of
the factorized file of a Hub folder beside its teacher on text."""

from __future__ import annotations

import json

import pytest
import transformers
from conftest import one_line_error

from lowrank_cli.decompose.ranks import rank_for_kappa
from lowrank_cli.io.manifest import Manifest
from lowrank_cli.io.safetensors import read_header

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama(real_checkpoints):
    return real_checkpoints("llama", "bf16")


def test_the_bf16_sharded_llama_is_the_release_it_stands_for(llama):
    config = json.loads((llama / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and (llama / "chat_template.jinja").is_file()
    assert {t.dtype for t in read_header(llama).tensors.values()} == {"BF16"}


def test_whitened_llama_at_kappa_1_25_exports_to_onnx_and_dense_in_fp32_and_bf16(cli, llama, tmp_path):
    fact = tmp_path / "k1.25"
    r = cli("factorize", llama, "--recipe", "causal-lm", "--kappa", "1.25", "--calib-samples", "16", "--out", fact, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    manifest = Manifest.from_header(read_header(fact / "model.safetensors"))
    linears = [e for e in manifest.layers.values() if e.kind != "embedding"]
    # the recipe's sensitivity allocation spreads uniform κ = 1.25's parameters over the 14 linears (q, k, v, o, gate, up,
    # down × 2 layers): some get more rank, some stay dense, the count stays within the uniform one
    alloc = json.loads(r.out)["allocation"]
    assert alloc["allocation"] == "sensitivity" and len(alloc["layers"]) == 14 and alloc["budget"]["cost"] <= alloc["uniform_kappa"]["cost"]
    assert linears and {e.method for e in linears} == {"whitened"} and {e.rule for e in linears} == {"budget_kappa=1.25"}
    ranks = {row["name"]: row["rank"] for row in alloc["layers"]}
    assert all(e.rank == ranks[n] for n, e in manifest.layers.items() if e.kind != "embedding")  # the manifest holds the allocation's ranks
    assert any(e.rank > rank_for_kappa(e.d_in, e.d_out, 1.25) for e in linears)  # not the uniform ranks
    for fmt, dtype, out in (("onnx", "float32", tmp_path / "m-onnx"), ("dense", "float32", tmp_path / "dense"),
                            ("dense", "bfloat16", tmp_path / "dense-bf16")):
        r = cli("export", fact, "--format", fmt, "--dtype", dtype, "--out", out, "--json")
        assert r.code == 0, (fmt, dtype, r.err)
        v = json.loads(r.out)["verification"]
        assert v["relative_diff"] <= (5e-4 if dtype == "float32" else 3e-2), (fmt, dtype, v)
        if dtype != "float32":
            assert v["top1_agreement"] >= 0.99 and {t.dtype for t in read_header(out).tensors.values()} == {"BF16"}
    for folder in (fact, tmp_path / "m-onnx", tmp_path / "dense", tmp_path / "dense-bf16"):
        assert (folder / "chat_template.jinja").read_bytes() == (llama / "chat_template.jinja").read_bytes(), folder
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense-bf16"), dtype="auto")
    assert str(dense.dtype) == "torch.bfloat16" and dense.lm_head.weight is dense.model.embed_tokens.weight


def test_a_run_of_the_llama_keeps_its_chat_template_and_evaluates_beside_its_teacher(cli, llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("select: {exclude: [lm_head]}\nfactorize: {kappa: 2}\ndata: {source: pydoc, num_workers: 0, max_length: 16}\n"
                      "distill: {epochs: 1, max_steps: 2, batch_size: 4, lr: 0.001, warmup_epochs: 0, eval_examples: 8, amp: none}\n")
    run = tmp_path / "run"
    r = cli("compress", llama, "--recipe", recipe, "--out", run, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert (run / "chat_template.jinja").read_bytes() == (llama / "chat_template.jinja").read_bytes()
    texts = tmp_path / "docs.txt"
    texts.write_text("".join(f"line {i} of a document with a few words\n" for i in range(6)))
    for student in (run / "student.safetensors", run):  # the factorized file of a Hub folder, and the folder
        r = cli("evaluate", student, "--data", texts, "--teacher", llama, "--json")
        assert r.code == 0, r.err
        e = json.loads(r.out)
        assert e["examples"] == 6 and e["teacher"]["examples"] == 6 and 1 < e["perplexity"] < 1e4 and 1 < e["teacher"]["perplexity"] < 1e4
    one_line_error(cli("evaluate", run / "student.safetensors", "--data", texts, "--teacher", tmp_path / "nothing"), "nothing")


def test_asvd_at_one_rank_rule_is_refused_for_causal_lms_before_any_work(cli, llama, tmp_path, monkeypatch):
    """ASVD at uniform ranks collapsed a real 135 M Llama (perplexity 15 → 6.9·10⁵; whitened 46): refused in one line naming
    the recipe keys, in factorize (streamed and in memory), inspect and compress, before calibration data is read."""
    import lowrank_cli.pipelines.common.prepare as prepare
    import lowrank_cli.pipelines.factorize as factorize_pipeline

    def no_calibration(*a, **k):
        raise AssertionError("calibration data was read before the refusal")

    for module in (prepare, factorize_pipeline):
        monkeypatch.setattr(module, "calibration_for", no_calibration)
    recipe = tmp_path / "asvd.yaml"
    recipe.write_text("name: asvd\nselect: {exclude: [lm_head]}\nfactorize: {kappa: 1.25, method: asvd, calib_data: pydoc, calib_samples: 4}\n")
    for args in (("factorize", llama, "--out", tmp_path / "f", "--device", "cpu"), ("factorize", llama, "--out", tmp_path / "f.safetensors"),
                 ("inspect", llama), ("compress", llama, "--data", "pydoc", "--out", tmp_path / "run", "--device", "cpu")):
        r = cli(*args, "--recipe", recipe)
        one_line_error(r, "factorize.method 'asvd' with factorize.allocation 'uniform' and factorize.rank_rule 'kappa'", "causal-lm",
                       "factorize.method 'whitened'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asvd.yaml"]


def test_asvd_with_per_layer_ranks_is_accepted_for_causal_lms_and_the_library_refuses_uniform_ranks(llama):
    """The refusal is of uniform ranks only (energy rule, sensitivity allocation pass); the library refuses the same
    recipe with the recipe key as `param`, before replacing any layer."""
    import torch

    from lowrank_cli.errors import LowrankError
    from lowrank_cli.factorize import check_method, factorize_model
    from lowrank_cli.models.build import build_model
    from lowrank_cli.nn import LowRankLinear
    from lowrank_cli.recipe import recipe_from_dict

    built = build_model(llama)
    task = built.family.task(built.model)
    base = {"name": "a", "select": {"exclude": ["lm_head"]}}
    check_method(recipe_from_dict({**base, "factorize": {"method": "asvd", "rank_rule": "energy", "energy": 0.9}}), task)
    check_method(recipe_from_dict({**base, "factorize": {"method": "asvd", "kappa": 2, "allocation": "sensitivity"}}), task)
    check_method(recipe_from_dict({**base, "factorize": {"method": "whitened", "kappa": 2}}), task)
    bad = recipe_from_dict({**base, "factorize": {"method": "asvd", "kappa": 2}})
    with pytest.raises(LowrankError) as e:
        factorize_model(built.model, bad, family=built.family, calibration=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}])
    assert getattr(e.value, "param", None) == "factorize.allocation"
    assert not any(isinstance(m, LowRankLinear) for m in built.model.modules())  # nothing replaced
