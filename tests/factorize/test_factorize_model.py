import math

import pytest
import torch
from conftest import tiny_vit
from torch import nn

from lowrank_cli.decompose import rank_for_energy, rank_for_kappa
from lowrank_cli.factorize import factorize_model, factorize_state_dict
from lowrank_cli.models import linear_candidates
from lowrank_cli.nn import LowRankLinear
from lowrank_cli.plan import plan_layers
from lowrank_cli.recipe import Recipe, recipe_from_dict


def best_rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


@pytest.mark.parametrize("d_in,d_out,rank", [(64, 192, 24), (96, 40, 7), (33, 33, 1)])
def test_lowrank_linear_is_best_rank_r_approximation(d_in, d_out, rank):
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out)
    low = LowRankLinear.from_linear(dense, rank)
    w = (low.up.weight.double() @ low.down.weight.double())
    ref = best_rank_r(dense.weight.detach(), rank)
    assert torch.linalg.norm(w - ref) / torch.linalg.norm(ref) < 1e-5
    # √Σ split into both factors: down's rows and up's columns have equal norms (√σ_i each)
    torch.testing.assert_close(low.down.weight.norm(dim=1), low.up.weight.norm(dim=0), rtol=1e-4, atol=1e-6)
    assert low.down.bias is None
    torch.testing.assert_close(low.up.bias, dense.bias)
    x = torch.randn(5, d_in)
    torch.testing.assert_close(low(x), x @ ref.float().T + dense.bias, rtol=1e-4, atol=1e-5)


def test_full_rank_factorization_is_exact_and_merge_recovers_dense():
    torch.manual_seed(1)
    dense = nn.Linear(20, 12)
    low = LowRankLinear.from_linear(dense, 12)
    merged = low.merge()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight, dense.weight, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 20)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-5, atol=1e-5)


def test_rank_rule_kappa_matches_pela_formula():
    assert rank_for_kappa(768, 2304, 2) == 288  # deit-base qkv: exactly half
    assert rank_for_kappa(768, 3072, 2) == 307
    assert rank_for_kappa(128, 128, 1.5) == math.floor(128 * 128 / (1.5 * 256))
    assert rank_for_kappa(3, 3, 100) == 1  # at least 1


def test_energy_rule_picks_smallest_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, .25 of 14.25
    assert rank_for_energy(s, 9 / 14.25) == 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 1.0) == 4


def test_factorize_model_replaces_selected_layers_only():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    plans = factorize_model(model, Recipe()).plans
    names = {p.name for p in plans if p.factorized}
    assert names == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    for p in plans:
        assert isinstance(model.get_submodule(p.name), LowRankLinear if p.factorized else nn.Linear)
    qkv = model.get_submodule("blocks.0.attn.qkv")
    assert (qkv.rank, qkv.down.weight.shape, qkv.up.weight.shape) == (24, (24, 64), (192, 24))
    assert model(x).shape == (2, 10)
    head = next(p for p in plans if p.name == "head")
    assert not head.factorized and "head" in head.reason


def test_layer_that_would_not_shrink_stays_dense_with_reason():
    recipe = recipe_from_dict({"factorize": {"rank_rule": "rank", "rank": 60}})
    plans = plan_layers(linear_candidates(tiny_vit()), recipe)
    fc1 = next(p for p in plans if p.name == "blocks.0.mlp.fc1")  # 64 -> 256: 60*320 >= 64*256
    assert not fc1.factorized and "would not shrink" in fc1.reason and fc1.rank == 60


def test_overrides_and_patterns():
    recipe = recipe_from_dict({
        "select": {"include": ["blocks.*"], "exclude": ["fc2"],
                   "overrides": [{"pattern": "blocks.1.attn", "rank": 4}, {"pattern": "qkv", "skip": True}]},
        "factorize": {"kappa": 3},
    })
    plans = {p.name: p for p in plan_layers(linear_candidates(tiny_vit()), recipe)}
    assert plans["blocks.1.attn.qkv"].rank == 4  # first matching override wins
    assert not plans["blocks.0.attn.qkv"].factorized and "override" in plans["blocks.0.attn.qkv"].reason
    assert not plans["blocks.0.mlp.fc2"].factorized and "'fc2'" in plans["blocks.0.mlp.fc2"].reason
    assert plans["blocks.0.mlp.fc1"].rank == rank_for_kappa(64, 256, 3)
    assert plans["head"].reason == "not matched by select.include"


def test_min_out_features_and_multihead_attention_are_skipped():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 2)
            self.fc = nn.Linear(32, 64)
            self.tiny = nn.Linear(32, 5)

    plans = {p.name: p for p in plan_layers(linear_candidates(Net()), Recipe())}
    assert not plans["mha.out_proj"].factorized and "MultiheadAttention" in plans["mha.out_proj"].reason
    assert not plans["tiny"].factorized and "fewer than 10 outputs" in plans["tiny"].reason
    assert plans["fc"].factorized and plans["fc"].rank == rank_for_kappa(32, 64, 2)


def test_weight_only_factorization_keys_and_values():
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48)
    tensors = {"enc.layer.bias": b, "enc.layer.weight": w, "enc.norm.weight": torch.ones(32)}
    from lowrank_cli.models import Candidate

    plans = plan_layers([Candidate("enc.layer", 32, 48, True)], Recipe())
    out = factorize_state_dict(tensors, plans, list(tensors))
    assert list(out) == ["enc.layer.up.bias", "enc.layer.down.weight", "enc.layer.up.weight", "enc.norm.weight"]
    r = rank_for_kappa(32, 48, 2)
    assert out["enc.layer.down.weight"].shape == (r, 32)
    approx = out["enc.layer.up.weight"].double() @ out["enc.layer.down.weight"].double()
    ref = best_rank_r(w, r)
    assert torch.linalg.norm(approx - ref) / torch.linalg.norm(ref) < 1e-5
    torch.testing.assert_close(out["enc.layer.up.bias"], b)


def test_bf16_weights_keep_their_dtype_and_svd_runs_in_fp32():
    dense = nn.Linear(64, 64).to(torch.bfloat16)
    low = LowRankLinear.from_linear(dense, 16)
    assert low.down.weight.dtype == torch.bfloat16 and low.up.weight.dtype == torch.bfloat16
    ref = best_rank_r(dense.weight.float(), 16)
    err = torch.linalg.norm(low.up.weight.double() @ low.down.weight.double() - ref) / torch.linalg.norm(ref)
    assert err < 2e-2  # bf16 rounding of the factors only
