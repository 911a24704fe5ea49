"""Parameter and MAC counting, attention matrix products included.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls and convolutions but not the CPU
kernel of fused `scaled_dot_product_attention` that timm uses, so on CPU it misses
`Q·Kᵀ` and `A·V` (`deit_base_patch16_224`: 16.85 instead of 17.6 GMACs). We register the
attention formula for that kernel too. One MAC = 2 FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lowrank_cli.select import LayerPlan


def count_params(model: nn.Module) -> int:
    """Number of parameters (elements), shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for: its patch embedding's image size, else its data config."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is not None:
        proj = getattr(pe, "proj", None)
        chans = getattr(proj, "in_channels", 3)
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return (chans, int(h), int(w))
    return tuple(timm.data.resolve_model_data_config(model)["input_size"])


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

    def macs_after(self, plans: list[LayerPlan]) -> int:
        """MACs once the planned layers are factorized: each saves rows · (d_in·d_out − r·(d_in+d_out))."""
        return self.macs - sum(self.linear_rows.get(p.name, 0) * p.macs_per_token_saved for p in plans)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...] | None = None, batch: int = 1) -> MacCount:
    """Count the MACs of one forward pass at `batch` images of `input_size` (default: the model's)."""
    input_size = input_size or model_input_size(model)
    param = next(model.parameters(), None)
    x = torch.randn(batch, *input_size, device=param.device if param is not None else "cpu")
    rows: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(mod, inputs, _out, name=name):
                rows[name] = rows.get(name, 0) + inputs[0].numel() // inputs[0].shape[-1]
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
        with counter:
            model(x.to(param.dtype) if param is not None else x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return MacCount(counter.get_total_flops() // 2, rows)
