"""`LowRankLinear`'s call: the two products straight away when nothing watches its halves, through the halves when
something does (hooks of their own or global ones, a parametrization), with the same outputs and gradients either way."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from lowrank_cli.nn.lowrank import LowRankLinear


def _layer() -> tuple[LowRankLinear, torch.Tensor]:
    torch.manual_seed(0)
    return LowRankLinear(24, 16, 5), torch.randn(3, 7, 24)


def test_the_direct_call_equals_the_halves_and_backpropagates_the_same():
    layer, x = _layer()
    want = layer.up(layer.down(x))
    got = layer(x)
    assert torch.equal(got, want)
    got.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer.up(layer.down(x)).square().sum().backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, layer.parameters()))


def test_hooks_on_a_half_and_global_hooks_still_see_the_call():
    layer, x = _layer()
    seen = []
    handle = layer.down.register_forward_hook(lambda m, args, out: seen.append(("down", tuple(out.shape))))
    layer(x)
    handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, args: seen.append(type(m).__name__))
    layer(x)
    handle.remove()
    layer(x)  # nothing watches any more
    assert seen == [("down", (3, 7, 5)), "LowRankLinear", "Linear", "Linear"]


def test_a_parametrized_half_is_called_as_a_module():
    layer, x = _layer()
    want = layer(x)
    parametrize.register_parametrization(layer.up, "weight", _Double())
    assert torch.allclose(layer(x), 2 * (want - layer.up.bias) + layer.up.bias, atol=1e-6)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w
