"""A small ViT trained on sklearn's digits, for benchmarks that need accuracy numbers.

`digits_teacher()` trains it once (about a minute on 2 CPU cores) and caches the weights
in the temp folder; `digits_split()` gives the same normalized train / held-out images the
teacher was trained and is evaluated on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_cli.data import TensorImages, digits_tensors
from lowrank_cli.distill.distributed import DistEnv
from lowrank_cli.distill.objective import DistillationObjective
from lowrank_cli.distill.train import total_steps, train
from lowrank_cli.factorize import collect_input_stats
from lowrank_cli.models import get_family
from lowrank_cli.recipe import DistillConfig

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3, "num_classes": 10}
# the distillation budget the benchmarks give every factorized student (same steps, lr, seed)
DISTILL = {"batch_size": 64, "lr": 1e-3, "warmup_epochs": 0.5, "min_lr": 1e-5, "alpha": 1.0, "beta": 0.0, "seed": 0, "max_shift": 1}
TRAIN = {"epochs": 60, "batch": 64, "lr": 2e-3, "weight_decay": 0.05, "n_train": 1200, "seed": 0}


def new_model() -> nn.Module:
    return timm.create_model(ARCH, pretrained=False, **KWARGS)


def digits_split(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): a fixed shuffle of the 1797 digits, 1200 / 597."""
    x, y = digits_tensors(get_family("timm").data_config(model))
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


def distill_settings(epochs: int, n_train: int) -> str:
    cfg = distill_config(epochs)
    return (f"PELA distillation (lowrank_cli.distill.train + DistillationObjective, base loss ce + α·feature KD, α={cfg.alpha:g}, "
            f"β={cfg.beta:g}): {epochs} epochs = {total_steps(n_train, cfg)} steps of batch {cfg.batch_size} on the {n_train} training images "
            f"(±{DISTILL['max_shift']} px shifts), lr {cfg.lr:g} (warm-up {cfg.warmup_epochs:g} epoch, cosine to {cfg.min_lr:g}), "
            f"AdamW wd {cfg.weight_decay:g}, clip {cfg.clip_grad:g}, seed {cfg.seed}")


def distill_config(epochs: int) -> DistillConfig:
    d = {k: v for k, v in DISTILL.items() if k != "max_shift"}
    return DistillConfig(epochs=epochs, amp="none", log_every=10**6, **d)


def distill(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """PELA-distil `student` (factorized, trained in place) against the frozen dense `teacher`
    on the training images `x`, `y` with the library's training loop; the same budget and
    seed for every student. The teacher is copied, so the caller's stays trainable/unchanged."""
    cfg = distill_config(epochs)
    torch.manual_seed(cfg.seed)  # the shifts draw from the global RNG; the data order from cfg.seed
    objective = DistillationObjective(student, copy.deepcopy(teacher), cfg, base="ce", family=get_family("timm"))
    try:
        train(student, objective, TensorImages(x, y, max_shift=DISTILL["max_shift"]), cfg, DistEnv())
    finally:
        objective.close()
    return student.eval()
