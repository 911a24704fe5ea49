"""Parameter and MAC counting, attention matrix products included.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls and convolutions but not the CPU
kernel of fused `scaled_dot_product_attention` that timm uses, so on CPU it misses
`Q·Kᵀ` and `A·V` (`deit_base_patch16_224`: 16.85 instead of 17.6 GMACs). We register the
attention formula for that kernel too. One MAC = 2 FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lowrank_cli.nn.lowrank import is_conv1d


class _Saving(Protocol):
    name: str
    macs_per_token_saved: int


def count_params(model: nn.Module) -> int:
    """Number of parameters (elements), shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


@dataclass
class MacCount:
    """MACs of one forward pass, and the number of input rows (tokens × batch) of each linear."""

    macs: int
    linear_rows: dict[str, int] = field(default_factory=dict)

    def macs_after(self, plans: Iterable[_Saving]) -> int:
        """MACs once the planned layers are factorized: each saves rows · (d_in·d_out − r·(d_in+d_out))."""
        return self.macs - sum(self.linear_rows.get(p.name, 0) * p.macs_per_token_saved for p in plans)


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


@torch.no_grad()
def count_macs(model: nn.Module, inputs: Any, call: Callable[[nn.Module, Any], Any] = _call) -> MacCount:
    """Count the MACs of one forward pass of `model` on `inputs` (a tensor or a mapping of them).

    `inputs` are moved to the model's device and floating-point ones to its dtype. Also counts
    the input rows of every `nn.Linear` (tokens per example × batch), which MAC savings need.
    """
    param = next(model.parameters(), None)
    if param is not None:
        move = lambda t: t.to(param.device, dtype=param.dtype if t.is_floating_point() else None)  # noqa: E731
        inputs = {k: move(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else move(inputs)
    rows: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            def hook(mod, args, _out, name=name):
                rows[name] = rows.get(name, 0) + args[0].numel() // args[0].shape[-1]
            hooks.append(module.register_forward_hook(hook))
        elif isinstance(module, nn.Embedding):  # an embedding's rows: the ids it looks up
            def lookup(mod, args, _out, name=name):
                rows[name] = rows.get(name, 0) + args[0].numel()
            hooks.append(module.register_forward_hook(lookup))
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
        with counter:
            call(model, inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return MacCount(counter.get_total_flops() // 2, rows)
