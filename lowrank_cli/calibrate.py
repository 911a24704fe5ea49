"""Calibration data, and the per-layer input statistics that data-aware factorization needs.

`calibration_batches` gives a few hundred images (a folder, sklearn's `digits`, or
`synthetic` noise) at the model's input size; `collect_input_stats` streams them through
the model with forward pre-hooks on the selected linears and accumulates each layer's
input Gram matrix `X Xᵀ` (d_in × d_in, fp64; products in fp32 on the model's device) and
its mean |x| per input feature (for ASVD).

Memory: the Grams of all selected layers are held during one calibration pass when they
fit under `max_gram_bytes` (default 2 GiB); otherwise the layers are split into groups and
the calibration data is run once per group. Holding them all is the right default: the
calibration forward passes, not the Grams, dominate the cost, and `deit_base_patch16_224`'s
48 Grams take 1.08 GB in fp64 (12 × (3·768² + 3072²) × 8 B), while one layer at a time
would mean 48 passes over the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.flops import model_input_size

CalibrationSource = str  # a folder of images, "digits" or "synthetic"


def calibration_batches(source: CalibrationSource, model: nn.Module, n_samples: int = 256, batch_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """`n_samples` images for calibration, in batches of `batch_size`, at the model's input size.

    `source`: `synthetic` (standard normal images, seeded), `digits` (a seeded random
    subset of the training split of sklearn's digits, as `distill.data.digits` makes it), or a folder of images
    that timm's `create_dataset` reads (class sub-folders), with the model's eval
    transforms. Returned as a list so that it can be passed over more than once; it holds
    `n_samples·C·H·W` floats (256 images at 224² take 154 MB).
    """
    size = model_input_size(model)
    gen = torch.Generator().manual_seed(seed)
    if source == "synthetic":
        images = torch.randn(n_samples, *size, generator=gen)
    elif source == "digits":
        # the training split only: `evaluate --data digits` reports on the other images
        from lowrank_cli.distill.data import digits  # not at the top: distill imports this module

        x = digits(model).train.images
        images = x[torch.randperm(len(x), generator=gen)[:n_samples]]
    else:
        images = _folder_images(Path(source), model, n_samples, gen)
    return list(images.split(batch_size))


def _folder_images(root: Path, model: nn.Module, n_samples: int, gen: torch.Generator) -> torch.Tensor:
    import timm.data

    if not root.is_dir():
        raise LowrankError(f"--calib-data '{root}': not a folder of images, nor 'digits' or 'synthetic'")
    cfg = timm.data.resolve_data_config({"input_size": model_input_size(model)}, model=model)
    try:
        dataset = timm.data.create_dataset("", root=str(root), transform=timm.data.create_transform(**cfg, is_training=False))
    except Exception as e:  # timm raises several types for an unreadable folder
        raise LowrankError(f"--calib-data '{root}': cannot read images from it ({e})") from None
    if len(dataset) == 0:
        raise LowrankError(f"--calib-data '{root}': no images found")
    idx = torch.randperm(len(dataset), generator=gen)[:n_samples].tolist()
    return torch.stack([dataset[i][0] for i in idx])


@dataclass
class LayerInputStats:
    """Statistics of one linear layer's inputs over the calibration set (rows = tokens × images)."""

    gram: torch.Tensor | None  # Σ x xᵀ over rows, d_in × d_in, fp64
    abs_sum: torch.Tensor  # Σ |x| over rows, d_in, fp64
    rows: int = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


def _batches_of(calibration: Iterable) -> Iterator[torch.Tensor]:
    for batch in calibration:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch  # (images, labels) loaders too


@torch.no_grad()
def collect_input_stats(model: nn.Module, names: list[str], calibration: Iterable, gram: bool = True) -> dict[str, LayerInputStats]:
    """One pass of `calibration` (image batches, or (images, labels) pairs) through `model`,
    accumulating the input statistics of the `nn.Linear`s called `names`.

    The model runs in eval mode; its weights are not changed. Hooks are removed afterwards.
    """
    param = next(model.parameters())
    stats: dict[str, LayerInputStats] = {}
    hooks = []
    for name in names:
        layer = model.get_submodule(name)
        d_in = layer.in_features
        st = stats[name] = LayerInputStats(
            torch.zeros(d_in, d_in, dtype=torch.float64, device=param.device) if gram else None,
            torch.zeros(d_in, dtype=torch.float64, device=param.device),
        )

        def hook(_mod, args, st=st):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if st.gram is not None:
                st.gram += (x.T @ x).double()  # fp32 product per batch, fp64 sum over batches
            st.abs_sum += x.abs().sum(0).double()
            st.rows += x.shape[0]

        hooks.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for images in _batches_of(calibration):
            model(images.to(device=param.device, dtype=param.dtype))
            seen += len(images)
        if seen == 0:
            raise LowrankError("calibration data is empty: give at least one image (--calib-samples N)")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats


def gram_groups(model: nn.Module, names: list[str], max_gram_bytes: int) -> list[list[str]]:
    """Split `names` into consecutive groups whose fp64 Grams fit in `max_gram_bytes` (one layer at least)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        d_in = model.get_submodule(name).in_features
        need = d_in * d_in * 8
        if groups[-1] and size + need > max_gram_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return [g for g in groups if g]

