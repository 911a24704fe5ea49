import json

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS, calibration, macs_of, model_args, one_line_error, tiny_vit

from lowrank_cli.decompose import max_shrinking_rank
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize import factorize_model
from lowrank_cli.models import linear_candidates
from lowrank_cli.plan import LayerPlan, allocate_ranks, plan_layers
from lowrank_cli.recipe import recipe_from_dict

SPECTRA = {
    "a": torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1]),  # one strong direction, then flat
    "b": torch.tensor([5.0, 4, 3, 2, 1, 1, 1, 1]),  # slowly decaying
}


def _plans(target: float, kind: str = "params") -> list[LayerPlan]:
    return [LayerPlan(n, 8, 8, False, True, None, f"budget_{kind}={target}") for n in SPECTRA]


def test_greedy_allocation_exact_numbers_beats_uniform_kappa():
    plans = _plans(0.5)  # 2 layers of 64 weights; budget 64 = 4 ranks of 16
    alloc = allocate_ranks(plans, SPECTRA.__getitem__)
    # floors 1 + 1, then σ² = 16 (b) and 9 (b) beat the 1s of a
    assert alloc.ranks == {"a": 1, "b": 3} and alloc.cost == 64 and alloc.base_cost == 128
    assert alloc.dropped == pytest.approx(7 * 1 + (4 + 1 + 1 + 1 + 1))
    assert [(p.rank, p.factorized) for p in plans] == [(1, True), (3, True)]
    assert plans[1].energy_kept == pytest.approx((25 + 16 + 9) / 58)
    # uniform κ = 2 at the same budget: rank 2 each, dropping 6 + 24 = 30 > 15
    assert alloc.uniform_ranks == {"a": 2, "b": 2} and alloc.uniform_cost == 64
    assert alloc.uniform_dropped == pytest.approx(6 + 9 + 4 + 1 + 1 + 1 + 1)
    assert alloc.uniform_kappa == 1.334  # the smallest 4-digit κ that fits: floor(64 / (16 κ)) = 2 for κ > 4/3


def test_floors_respected_and_too_small_budget_is_an_error():
    plans = _plans(0.5)
    alloc = allocate_ranks(plans, SPECTRA.__getitem__, min_rank=2)
    assert alloc.ranks == {"a": 2, "b": 2} and alloc.cost == 64
    with pytest.raises(LowrankError, match="target_params 0.1 cannot be met.*min_rank 1"):
        allocate_ranks(_plans(0.1), SPECTRA.__getitem__)
    # a floor that would not shrink the layer keeps it dense
    assert max_shrinking_rank(8, 8) == 3
    alloc = allocate_ranks(_plans(1.0), SPECTRA.__getitem__, min_rank=4)
    assert alloc.ranks == {"a": None, "b": None} and alloc.cost == 128 and alloc.dropped == 0


def test_a_layer_reaching_break_even_goes_dense_within_budget():
    # 3 ranks of a cost 48; dense costs 64: the last 16 buy all of a's remaining energy
    plans = _plans(0.75)  # budget 96
    spectra = {"a": torch.tensor([4.0, 4, 4, 4, 4, 4, 4, 4]), "b": torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])}
    alloc = allocate_ranks(plans, spectra.__getitem__)
    assert alloc.ranks == {"a": None, "b": 1} and alloc.cost == 64 + 16 and alloc.dropped == 0
    assert not plans[0].factorized and "keeps it dense" in plans[0].reason


@pytest.mark.parametrize("target", ["params", "macs"])
def test_tiny_vit_allocation_meets_target_just_under_and_beats_uniform(target):
    model = tiny_vit()
    recipe = recipe_from_dict({"factorize": {"rank_rule": "budget", f"target_{target}": 0.4}})
    plans = plan_layers(linear_candidates(model), recipe)
    # a trained-like spread of spectra: scale each layer's weight differently
    spectra = {p.name: torch.linalg.svdvals(model.get_submodule(p.name).weight.detach()) * (1 + i) for i, p in enumerate(plans)}
    rows = macs_of(model).linear_rows if target == "macs" else None
    alloc = allocate_ranks(plans, spectra.__getitem__, rows=rows)
    sel = [p for p in plans if p.rule is not None]
    unit = {p.name: (rows[p.name] if rows else 1) for p in sel}
    before = sum(unit[p.name] * p.d_in * p.d_out + (p.d_out if p.bias and not rows else 0) for p in sel)
    after = sum(unit[p.name] * (p.rank * (p.d_in + p.d_out) if p.factorized else p.d_in * p.d_out) + (p.d_out if p.bias and not rows else 0) for p in sel)
    assert alloc.base_cost == before and alloc.cost == after
    step = max(unit[p.name] * (p.d_in + p.d_out) for p in sel)
    assert 0.4 * before - step < after <= 0.4 * before
    assert alloc.uniform_cost <= 0.4 * before
    assert alloc.dropped < alloc.uniform_dropped
    if target == "params":
        assert sum(p.params_after for p in sel) == after


def test_budget_via_cli_inspect_and_factorize(cli, vit_ckpt, weights_ckpt, tmp_path):
    recipe = tmp_path / "b.yaml"
    recipe.write_text("factorize:\n  rank_rule: budget\n  target_params: 0.5\n  min_rank: 4\n")
    r = cli("inspect", vit_ckpt, "--recipe", recipe, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    a = d["allocation"]
    assert a["target"] == "params" and a["spectrum"] == "svd" and 0.49 < a["budget"]["fraction"] <= 0.5
    assert a["uniform_kappa"]["fraction"] <= 0.5 and len(a["layers"]) == 8
    ranks = {l["name"]: l["rank"] for l in d["layers"] if l["factorized"]}
    assert ranks == {l["name"]: l["rank"] for l in a["layers"]} and min(ranks.values()) >= 4
    out = tmp_path / "b.safetensors"
    r = cli("factorize", vit_ckpt, "--recipe", recipe, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out)
    assert r.code == 0, r.err
    assert "Budget allocation vs uniform κ" in r.out and "uniform-κ rank" in r.out
    # weight-only: parameters work, MACs need an architecture
    r = cli("factorize", weights_ckpt, "--recipe", recipe, "--out", tmp_path / "w.safetensors", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["allocation"]["budget"]["fraction"] <= 0.5
    macs = tmp_path / "m.yaml"
    macs.write_text("factorize:\n  rank_rule: budget\n  target_macs: 0.5\n")
    one_line_error(cli("inspect", weights_ckpt, "--recipe", macs), "target_macs needs an architecture")


@pytest.mark.parametrize("body,needles", [
    ("rank_rule: budget", ["rank_rule 'budget' needs exactly one of 'target_params: F' or 'target_macs: F'"]),
    ("rank_rule: budget\n  target_params: 0.5\n  target_macs: 0.5", ["got both target_params and target_macs"]),
    ("rank_rule: budget\n  target_params: 1.5", ["factorize.target_params", "less than or equal to 1"]),
    ("rank_rule: budget\n  target_macs: 0", ["factorize.target_macs", "greater than 0"]),
    ("target_params: 0.5", ["'target_params' is only used with 'rank_rule: budget'"]),
    ("rank_rule: budget\n  target_params: 0.5\n  min_rank: 0", ["factorize.min_rank"]),
    ("method: whiten", ["factorize.method", "'whitened'"]),
    ("rank_rule: budget\n  target_param: 0.5", ["unknown key 'factorize.target_param'", "did you mean 'target_params'"]),
])
def test_bad_budget_and_method_configs_are_one_line_errors(cli, vit_ckpt, tmp_path, body, needles):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"factorize:\n  {body}\n")
    one_line_error(cli("factorize", vit_ckpt, "--recipe", recipe, "--out", tmp_path / "o.safetensors"), str(recipe), *needles)
    assert not (tmp_path / "o.safetensors").exists()


def test_kappa_on_the_command_line_replaces_a_budget_rule():
    recipe = recipe_from_dict({"factorize": {"rank_rule": "budget", "target_macs": 0.5}}).with_kappa(3)
    f = recipe.factorize
    assert (f.rank_rule, f.kappa, f.target_macs, f.rule_label()) == ("kappa", 3.0, None, "kappa=3")


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_energy_override_counts_at_its_rank_in_the_budget(method):
    # an energy-rule override's rank is known only from its spectrum: the budget must count it
    # at that rank (not dense), and the whitened path must factorize it at that rank
    model = tiny_vit()
    recipe = recipe_from_dict({
        "factorize": {"rank_rule": "budget", "target_params": 0.6, "method": method},
        "select": {"overrides": [{"pattern": "blocks.0.mlp.fc1", "energy": 0.5}]},
    })
    calib = calibration("synthetic", model, 8, 4) if method == "whitened" else None
    result = factorize_model(model, recipe, calibration=calib)
    plans, alloc = result.plans, result.allocation
    fc1 = next(p for p in plans if p.name == "blocks.0.mlp.fc1")
    assert fc1.factorized and fc1.rank is not None and model.get_submodule(fc1.name).rank == fc1.rank
    sel = [p for p in plans if p.rule is not None]
    after = sum(p.params_after for p in sel)
    assert alloc.cost == after
    step = max(p.d_in + p.d_out for p in sel)
    assert 0.6 * alloc.base_cost - step < after <= 0.6 * alloc.base_cost
