"""A small ViT trained on sklearn's digits, for benchmarks that need accuracy numbers.

`digits_teacher()` trains it once (about a minute on 2 CPU cores) and caches the weights
in the temp folder; `digits_split()` gives the same normalized train / held-out images the
teacher was trained and is evaluated on.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_cli.calibrate import collect_input_stats
from lowrank_cli.distill.data import digits_tensors

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3, "num_classes": 10}
TRAIN = {"epochs": 60, "batch": 64, "lr": 2e-3, "weight_decay": 0.05, "n_train": 1200, "seed": 0}


def new_model() -> nn.Module:
    return timm.create_model(ARCH, pretrained=False, **KWARGS)


def digits_split(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): a fixed shuffle of the 1797 digits, 1200 / 597."""
    x, y = digits_tensors(model)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    x, y = x[perm], y[perm]
    n = TRAIN["n_train"]
    return x[:n], y[:n], x[n:], y[n:]


def digits_teacher(verbose: bool = True) -> nn.Module:
    key = hashlib.sha256(json.dumps([ARCH, KWARGS, TRAIN, timm.__version__]).encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"lowrank_digits_vit_{key}.safetensors"
    torch.manual_seed(TRAIN["seed"])
    model = new_model()
    if cache.exists():
        model.load_state_dict(load_file(str(cache)))
        return model.eval()
    xtr, ytr, xte, yte = digits_split(model)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    steps = TRAIN["epochs"] * ((len(xtr) + TRAIN["batch"] - 1) // TRAIN["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TRAIN["lr"], total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(TRAIN["seed"])
    t0 = time.perf_counter()
    model.train()
    for epoch in range(TRAIN["epochs"]):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), TRAIN["batch"]):
            idx = perm[i : i + TRAIN["batch"]]
            xb = xtr[idx]
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # light augmentation: ±1 px shifts
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), ytr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    if verbose:
        print(f"trained the digits teacher in {time.perf_counter() - t0:.0f} s: held-out top-1 {accuracy(model, xte, yte):.1%}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(torch.cat([model(xb).argmax(-1) for xb in x.split(256)]).eq(y).float().mean())


def selected_names(model: nn.Module) -> list[str]:
    return [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def input_grams(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named layer's input Gram on images `x`, through the (dense) `model`."""
    stats = collect_input_stats(model, names, list(x.split(128)))
    return {n: s.gram for n, s in stats.items()}


def output_error(dense: nn.Module, factorized: nn.Module, name: str, gram: torch.Tensor) -> float:
    """‖(W − W')X‖_F / ‖W X‖_F for inputs with Gram `gram` (W' = up·down, or W when still dense)."""
    w = dense.get_submodule(name).weight.detach().double()
    layer = factorized.get_submodule(name)
    wp = (layer.up.weight.double() @ layer.down.weight.double()).detach() if hasattr(layer, "up") else layer.weight.detach().double()
    d = w - wp
    return float(torch.trace(d @ gram @ d.T) / torch.trace(w @ gram @ w.T)) ** 0.5
