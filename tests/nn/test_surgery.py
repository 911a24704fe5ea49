"""`replace_modules`: the one surgery every module swap goes through."""

import torch
from conftest import tiny_vit
from torch import nn

from lowrank_cli.nn import LowRankLinear, named_in, replace_modules


def test_replaces_selected_modules_in_order_and_never_descends_into_replacements():
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    seen = []

    def to_low(name, m):
        seen.append(name)
        return LowRankLinear.from_linear(m, 2)

    replaced = replace_modules(model, to_low, lambda _n, m: isinstance(m, nn.Linear))
    assert replaced == seen == ["0", "1.0", "1.2"]
    assert [type(m).__name__ for m in (model[0], model[1][0], model[1][1], model[1][2])] == ["LowRankLinear", "LowRankLinear", "ReLU", "LowRankLinear"]
    # the halves of a LowRankLinear are nn.Linear, but a replacement is not searched again
    assert replace_modules(model, lambda n, m: None, lambda _n, m: isinstance(m, nn.Linear)) == []


def test_fn_returning_none_keeps_the_module_and_names_select_by_path():
    model = tiny_vit()
    before = model.blocks[0].attn.qkv
    assert replace_modules(model, lambda n, m: None, named_in(["blocks.0.attn.qkv"])) == []
    assert model.blocks[0].attn.qkv is before
    names = ["blocks.1.attn.proj_drop", "head"]
    assert replace_modules(model, lambda n, m: nn.Identity(), named_in(names)) == names
    assert isinstance(model.head, nn.Identity) and isinstance(model.blocks[1].attn.proj_drop, nn.Identity)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)  # the head is gone: features come out
