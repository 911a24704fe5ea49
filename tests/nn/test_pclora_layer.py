import math

import pytest
import torch
from conftest import tiny_vit
from torch import nn

from lowrank_cli.factorize import apply_pclora, factorize_model
from lowrank_cli.nn import LowRankLinear, PCLoRALinear, decay_lambda, finalize, set_lambda
from lowrank_cli.recipe import recipe_from_dict


@pytest.mark.parametrize("schedule,mid", [("linear", 0.5), ("sine", 1 - math.sin(math.pi / 4)), ("one_minus_cosine", math.cos(math.pi / 4))])
def test_schedules_start_at_one_and_reach_exactly_zero_at_q(schedule, mid):
    assert decay_lambda(schedule, 0, 10) == 1.0
    assert decay_lambda(schedule, 5, 10) == pytest.approx(mid)
    assert [decay_lambda(schedule, n, 10) for n in (10, 11, 500)] == [0.0, 0.0, 0.0]
    values = [decay_lambda(schedule, n, 10) for n in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing to 0


@pytest.mark.parametrize("init", ["lora", "svd"])
def test_layer_equals_original_at_lambda_one(init):
    torch.manual_seed(0)
    dense = nn.Linear(32, 48)
    layer = PCLoRALinear.from_linear(dense, 8, init)
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert not layer.frozen_weight.requires_grad and not layer.frozen_bias.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"down.weight", "up.weight", "up.bias"}


@pytest.mark.parametrize("init", ["lora", "svd"])
def test_a_layer_without_bias_gets_no_adapter_bias(init):
    """Llama's linears have no bias: a PC-LoRA student kept a `C` for them, which the PELA manifest (bias: false) did not
    list, so the student written did not reload (found by tests/test_matrix.py)."""
    torch.manual_seed(0)
    dense = nn.Linear(32, 48, bias=False)
    layer = PCLoRALinear.from_linear(dense, 8, init)
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert layer.up.bias is None and layer.frozen_bias is None
    layer.lam = 0.0
    low = layer.to_low_rank()
    assert low.up.bias is None and set(low.state_dict()) == set(LowRankLinear.from_linear(dense, 8).state_dict())
    torch.testing.assert_close(low(x), layer(x), rtol=0, atol=0)


def test_lora_init_is_the_papers_formula():
    torch.manual_seed(0)
    dense = nn.Linear(16, 24)
    layer = PCLoRALinear.from_linear(dense, 4, "lora")
    torch.testing.assert_close(layer.frozen_weight, dense.weight)  # W₀ = W, b₀ = b since B = C = 0
    torch.testing.assert_close(layer.frozen_bias, dense.bias)
    assert layer.up.weight.abs().sum() == 0 and layer.up.bias.abs().sum() == 0 and layer.down.weight.abs().sum() > 0


def test_svd_init_at_lambda_zero_is_the_pela_svd_layer():
    torch.manual_seed(0)
    dense = nn.Linear(32, 48)
    layer = PCLoRALinear.from_linear(dense, 8, "svd")
    layer.lam = 0.0
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), LowRankLinear.from_linear(dense, 8)(x), rtol=1e-5, atol=1e-5)


def test_finalized_model_equals_model_at_lambda_zero():
    model = tiny_vit()
    recipe = recipe_from_dict({"factorize": {"rank_rule": "rank", "rank": 8}})
    plans = apply_pclora(model, recipe, init="lora", seed=1)
    assert sum(p.factorized for p in plans) == 8
    with torch.no_grad():  # move the adapters away from their init so the check means something
        for m in model.modules():
            if isinstance(m, PCLoRALinear):
                m.up.weight.normal_(0, 0.02)
                m.up.bias.normal_(0, 0.02)
    x = torch.randn(2, 3, 32, 32)
    set_lambda(model, 0.0)
    with torch.no_grad():
        at_zero = model(x)
        finalize(model)
        after = model(x)
    torch.testing.assert_close(after, at_zero, rtol=0, atol=0)
    assert not any(isinstance(m, PCLoRALinear) for m in model.modules())
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LowRankLinear) and qkv.rank == 8
    # the same structure (state-dict keys and shapes) as a PELA student at the same ranks
    pela = tiny_vit()
    factorize_model(pela, recipe)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in pela.state_dict().items()}


def test_kd_gradient_reaches_adapters_through_the_loss():
    # the third-party bug: KD computed through torch.tensor(list_of_losses) never trained
    torch.manual_seed(0)
    dense = nn.Linear(16, 16)
    layer = PCLoRALinear.from_linear(dense, 4, "lora")
    layer.lam = 0.5
    with torch.no_grad():
        layer.up.weight.normal_(0, 0.1)
    x = torch.randn(8, 16)
    target = torch.randn(8, 16)
    losses = [torch.nn.functional.mse_loss(layer(x), target)]
    torch.stack(losses).mean().backward()
    assert layer.down.weight.grad.abs().sum() > 0 and layer.up.weight.grad.abs().sum() > 0
    assert layer.frozen_weight.grad is None
