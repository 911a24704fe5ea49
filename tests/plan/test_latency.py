"""Latency-aware layer selection: decisions on given (fake) timings, and one real-timing smoke test."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS, calibration, latency_selection, manifest_of, model_args, one_line_error, tiny_vit

import lowrank_cli
import lowrank_cli.plan.latency as latency_mod
from lowrank_cli.factorize import factorize_model
from lowrank_cli.models import linear_candidates
from lowrank_cli.nn import LowRankLinear
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.pipelines.inspect import inspect_checkpoint
from lowrank_cli.plan import plan_layers
from lowrank_cli.recipe import recipe_from_dict

# Tiny ViT (17 tokens) at κ=2: qkv 64→192 r24, proj 64→64 r16, fc1 64→256 r25, fc2 256→64 r25.
# Seconds per call (dense, factorized), by (d_in, d_out):
FAKE = {
    (64, 192): (2.0e-3, 1.9e-3),  # 1.05×: not enough, dense
    (64, 64): (1.0e-3, 1.2e-3),  # slower factorized: dense
    (64, 256): (3.0e-3, 1.5e-3),  # 2×: factorized
    (256, 64): (2.2e-3, 2.0e-3),  # exactly the 1.1 margin: factorized
}
QKV_REASON = "latency-aware: factorized 1.9 ms vs dense 2 ms (rank 24, batch 8 × 17 tokens), not ≥1.10× faster"
DENSE = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
PARAMS_GIVEN_UP = 2 * ((64 * 192 - 24 * 256) + (64 * 64 - 16 * 128))  # biases are kept either way
MACS_GIVEN_UP = 17 * PARAMS_GIVEN_UP  # per image: 17 rows through each layer


class FakeTimer:
    def __init__(self):
        self.calls = []

    def __call__(self, shapes, batch):
        self.calls.append(([(s.d_in, s.d_out, s.rank, s.tokens, s.bias) for s in shapes], batch))
        return [SimpleNamespace(dense_s=FAKE[(s.d_in, s.d_out)][0], factorized_s=FAKE[(s.d_in, s.d_out)][1]) for s in shapes]


def _recipe(**select):
    return recipe_from_dict({"select": {"exclude": ["norm", "head", "patch_embed"], "latency_aware": True, **select}, "factorize": {"kappa": 2}})


def _check_decisions(plans, lat):
    by = {p.name: p for p in plans}
    assert [n for n, p in by.items() if p.latency and p.latency["kept_dense"]] == DENSE
    assert by["blocks.0.attn.qkv"].reason == QKV_REASON and by["blocks.0.attn.qkv"].rank is None
    assert by["blocks.1.attn.proj"].reason.startswith("latency-aware: factorized 1.2 ms vs dense 1 ms (rank 16,")
    assert by["blocks.0.mlp.fc1"].factorized and by["blocks.0.mlp.fc1"].rank == 25 and by["blocks.0.mlp.fc1"].reason is None
    assert by["blocks.1.mlp.fc2"].factorized and by["blocks.1.mlp.fc2"].latency["speedup"] == pytest.approx(1.1)
    assert lat["kept_dense"] == DENSE and lat["params_given_up"] == PARAMS_GIVEN_UP and lat["macs_given_up"] == MACS_GIVEN_UP
    assert (lat["runtime"], lat["device"], lat["batch"], lat["margin"], lat["shapes_timed"]) == ("torch", "cpu", 8, 1.1, 4)
    assert set(lat["layers"]) == {p.name for p in plans if p.latency}  # the 8 timed: every non-head linear
    assert lat["layers"]["blocks.0.attn.qkv"] == {
        "d_in": 64, "d_out": 192, "rank": 24, "tokens": 17, "rows": 136, "dense_s": 2.0e-3, "factorized_s": 1.9e-3,
        "speedup": pytest.approx(2.0 / 1.9), "kept_dense": True, "params_given_up": 6144, "macs_given_up": 17 * 6144, "reason": QKV_REASON,
    }


def test_selection_decides_on_given_timings_one_timing_per_shape():
    model = tiny_vit()
    timer = FakeTimer()
    recipe = _recipe(latency_device="cpu")
    plans = plan_layers(linear_candidates(model), recipe)
    sel = latency_selection(model, recipe.select, timer)
    kept = sel.decide(plans)
    assert [p.name for p in kept] == DENSE
    # one call, each distinct (d_in, d_out, r, tokens, bias) once, at the recipe's batch
    assert timer.calls == [([(64, 192, 24, 17, True), (64, 64, 16, 17, True), (64, 256, 25, 17, True), (256, 64, 25, 17, True)], 8)]
    _check_decisions(plans, sel.to_dict())
    assert sel.decide(plans) == [] and len(timer.calls) == 1  # decided layers are not timed again


def test_margin_and_batch_change_the_decision():
    model = tiny_vit()
    timer = FakeTimer()
    recipe = _recipe(latency_margin=0.8, latency_batch=2, latency_device="cpu")  # accept up to 1.25× slower
    plans = plan_layers(linear_candidates(model), recipe)
    sel = latency_selection(model, recipe.select, timer)
    assert sel.decide(plans) == [] and all(p.factorized for p in plans if p.latency)
    assert timer.calls[0][1] == 2 and sel.to_dict()["layers"]["blocks.0.attn.qkv"]["rows"] == 34
    recipe = _recipe(latency_margin=2.5, latency_device="cpu")  # nothing is 2.5× faster
    plans = plan_layers(linear_candidates(model), recipe)
    assert len(latency_selection(model, recipe.select, FakeTimer()).decide(plans)) == 8


def test_inspect_reports_kept_dense_layers(vit_ckpt):
    plain_recipe = recipe_from_dict({"select": {"exclude": ["norm", "head", "patch_embed"]}, "factorize": {"kappa": 2}})
    plain = inspect_checkpoint(vit_ckpt, plain_recipe, TINY_VIT, TINY_VIT_KWARGS)
    insp = inspect_checkpoint(vit_ckpt, _recipe(latency_device="cpu"), TINY_VIT, TINY_VIT_KWARGS, layer_timer=FakeTimer())
    d = insp.to_dict()
    _check_decisions(insp.layers, d["latency"])
    assert plain.latency is None and d["params_after"] == plain.params_after + PARAMS_GIVEN_UP
    assert d["macs_after"] == plain.macs_after + MACS_GIVEN_UP
    layers = {l["name"]: l for l in json.loads(json.dumps(d))["layers"]}  # JSON-clean
    assert layers["blocks.0.attn.qkv"]["latency"]["kept_dense"] is True and layers["blocks.0.attn.qkv"]["reason"] == QKV_REASON


def test_factorize_records_timings_in_manifest_and_inspect_reads_them(vit_ckpt, tmp_path, cli):
    out = tmp_path / "vit.lat.safetensors"
    res = factorize_checkpoint(vit_ckpt, _recipe(latency_device="cpu"), out, TINY_VIT, TINY_VIT_KWARGS, layer_timer=FakeTimer())
    _check_decisions(res.inspection.layers, res.inspection.latency)
    m = manifest_of(out)
    assert m["recipe"]["select"]["latency_aware"] is True and m["recipe"]["select"]["latency_margin"] == 1.1
    assert sorted(m["layers"]) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert m["latency"] == json.loads(json.dumps(res.inspection.latency))
    model = lowrank_cli.load(out)
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear and isinstance(model.blocks[0].mlp.fc1, LowRankLinear)

    r = cli("inspect", out, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    layers = {l["name"]: l for l in d["layers"]}
    assert layers["blocks.0.attn.qkv"]["reason"] == QKV_REASON and layers["blocks.0.attn.qkv"]["factorized"] is False
    assert layers["blocks.0.mlp.fc1"]["latency"]["kept_dense"] is False and d["latency"]["params_given_up"] == PARAMS_GIVEN_UP
    table = cli("inspect", out).out
    assert "Latency-aware selection: kept dense" in table and "blocks.1.attn.proj" in table and "2.05 k" in table  # proj: 2048 given up


def test_cli_factorize_latency_aware_with_patched_timer(cli, vit_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(latency_mod, "default_timer", lambda config: FakeTimer())
    out = tmp_path / "o.safetensors"
    r = cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--kappa", "2", "--latency-aware", "--out", out, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["latency"]["kept_dense"] == DENSE  # the deit defaults exclude only norm/head/patch_embed/downsample here too
    r = cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--kappa", "2", "--latency-aware", "--out", out, "--force")
    assert r.code == 0, r.err
    assert "Latency-aware selection: kept dense" in r.out and "4 of 8 timed layers kept dense (4 shapes timed)" in r.out
    assert "left dense: latency-aware" not in r.out  # listed in the table, not one line each


def test_energy_rule_and_whitened_paths_decide_once_rank_known():
    torch.manual_seed(0)
    energy = recipe_from_dict({"select": {"exclude": ["norm", "head", "patch_embed"], "latency_aware": True, "latency_device": "cpu"},
                               "factorize": {"rank_rule": "energy", "energy": 0.5}})
    model = tiny_vit()
    timer = FakeTimer()
    fake = FAKE.copy()
    plans = factorize_model(model, energy, latency=latency_selection(model, energy.select, timer)).plans
    timed = [p for p in plans if p.latency]
    assert len(timed) == 8 and all(p.latency["rank"] is not None for p in timed) and len(timer.calls) >= 1
    for p in timed:  # the decision follows the fake timings whatever rank the energy rule gave
        d, f = fake[(p.d_in, p.d_out)]
        assert p.factorized == (d / f >= 1.1 * (1 - 1e-9))
        assert isinstance(model.get_submodule(p.name), LowRankLinear) == p.factorized

    whitened = recipe_from_dict({"select": {"exclude": ["norm", "head", "patch_embed"], "latency_aware": True, "latency_device": "cpu"},
                                 "factorize": {"method": "whitened", "kappa": 2}})
    model = tiny_vit()
    sel = latency_selection(model, whitened.select, FakeTimer())
    plans = factorize_model(model, whitened, calibration=calibration("synthetic", model, 16, 16), latency=sel).plans
    _check_decisions(plans, sel.to_dict())
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear and isinstance(model.blocks[1].mlp.fc2, LowRankLinear)


def test_real_timing_smoke(cli, vit_ckpt, tmp_path):
    """Measured timings: only the structure is asserted (the decisions depend on the machine)."""
    recipe = tmp_path / "lat.yaml"
    recipe.write_text("select:\n  exclude: [norm, head, patch_embed]\n  latency_aware: true\n  latency_threads: 1\n  latency_batch: 2\n")
    out = tmp_path / "real.safetensors"
    r = cli("factorize", vit_ckpt, "--recipe", recipe, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    lat = d["latency"]
    assert (lat["threads"], lat["batch"], lat["runtime"]) == (1, 2, "torch") and lat["shapes_timed"] == 4
    planned = [l for l in d["layers"] if l["latency"] is not None]
    assert len(planned) == 8 == len(lat["layers"])
    for l in planned:
        e = lat["layers"][l["name"]]
        assert e["dense_s"] > 0 and e["factorized_s"] > 0 and e["rows"] == 2 * 17
        assert e["kept_dense"] == (not l["factorized"]) == (e["speedup"] < 1.1)
        if l["factorized"]:
            assert l["rank"] == e["rank"] and e["params_given_up"] == 0
        else:
            assert l["reason"].startswith("latency-aware: factorized ") and "not ≥1.10× faster" in l["reason"]
    m = manifest_of(out)
    assert set(m["layers"]) == {l["name"] for l in planned if l["factorized"]} and set(m["latency"]["kept_dense"]) == {
        l["name"] for l in planned if not l["factorized"]}


def test_bad_latency_configs_are_one_line_errors(cli, vit_ckpt, weights_ckpt, tmp_path):
    def with_select(text):
        p = tmp_path / "bad.yaml"
        p.write_text(f"select:\n  {text}\n")
        return cli("inspect", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--recipe", p)

    one_line_error(with_select("latency_margin: 0"), "select.latency_margin", "greater than 0")
    one_line_error(with_select("latency_margin: -1.5"), "select.latency_margin")
    one_line_error(with_select("latency_awre: true"), "unknown key 'select.latency_awre'", "did you mean 'latency_aware'")
    one_line_error(with_select("latency_batch: 0"), "select.latency_batch")
    one_line_error(with_select("latency_device: tpu"), "select.latency_device", "'tpu'")
    one_line_error(with_select("latency_runtime: tensorrt"), "select.latency_runtime")
    # without an architecture there is no token count to time at
    one_line_error(cli("inspect", weights_ckpt, "--latency-aware"), "latency_aware needs an architecture", "--model")
    one_line_error(cli("factorize", weights_ckpt, "--latency-aware", "--out", tmp_path / "x.safetensors"), "latency_aware needs an architecture")
    assert not (tmp_path / "x.safetensors").exists()
