"""Benchmark: lowrank's factorization of deit_base_patch16_224 at κ = 2 vs bare torch.linalg.svd, and the whitened method's Grams.

Both run in this process on the same matrices, interleaved; prints seconds, the ratio (goal:
≤ 1.15×) and peak resident memory (and peak GPU memory). `--device` is where the SVDs run
(default: the library's choice, `decompose.svd_device()`: the GPU when there is one). The
library has no setting for it, so another device is patched in here. The weights stay on the
CPU, as `lowrank factorize` loads them: both sides copy each weight to the device.

`--gram-tokens N` also times the whitened method's statistics (`factorize.calibrate.collect_input_stats`:
each selected layer's input Gram, fp32 products summed in fp64, on the model's device) over
N tokens' worth of random images (DeiT-B at 224²: 197 tokens each, so 50 000 images =
9 850 000 tokens), chunked in batches of `--gram-batch` images made on the device (only one
batch and the Grams are held), against the same forward passes without the hooks; prints
tokens/s of both and of the Gram accumulation alone (the difference).

Run: python tests/benchmarks/bench_svd.py [--arch ARCH] [--kappa K] [--device cpu|cuda|auto] [--gram-tokens 9850000]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import resource
import time
from typing import Iterator

import timm
import torch
from torch import nn

import lowrank_cli.decompose.whiten as whiten_module
import lowrank_cli.factorize.model as factorize_module
from lowrank_cli.decompose import svd_device
from lowrank_cli.device import resolve_device
from lowrank_cli.factorize import collect_input_stats, factorize_model, linear_rows
from lowrank_cli.models import get_family, linear_candidates
from lowrank_cli.plan import plan_layers
from lowrank_cli.recipe import load_recipe

svd_module = importlib.import_module("lowrank_cli.decompose.svd")  # `import ... as` would give the package's function `svd`


def use_svd_device(device: torch.device) -> None:
    """Run the library's SVDs on `device`: it looks `svd_device` up in these modules at each call."""
    for module in (svd_module, whiten_module, factorize_module):
        module.svd_device = lambda _given=None: device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_svd(model: nn.Module, weights: list[torch.Tensor], recipe, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best seconds of (bare SVDs of `weights`, `factorize_model` of a copy of `model`), interleaved."""
    torch.linalg.svd(torch.randn(64, 64, device=device), full_matrices=False)  # the solver's start-up, outside the timings
    bare, ours = [], []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for w in weights:
            torch.linalg.svd(w.to(device).float(), full_matrices=False)
        sync(device)
        bare.append(time.perf_counter() - t)
        m = copy.deepcopy(model)
        sync(device)
        t = time.perf_counter()
        factorize_model(m, recipe, device=device)
        sync(device)
        ours.append(time.perf_counter() - t)
        del m
    return min(bare), min(ours)


def random_batches(images: int, batch: int, size: tuple[int, ...], device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, images, batch):
        yield torch.randn(min(batch, images - start), *size, device=device)


def time_grams(model: nn.Module, names: list[str], tokens: int, batch: int, device: torch.device) -> None:
    """tokens/s of `collect_input_stats` (forward + Grams) and of the same forward passes alone."""
    family = get_family("timm")
    per_image = linear_rows(model, family)[names[0]]
    images = math.ceil(tokens / per_image)
    size = family.data_config(model).input_size
    model = model.to(device).eval()
    gram_bytes = sum(model.get_submodule(n).in_features ** 2 * 8 for n in names)
    sync(device)
    t = time.perf_counter()
    collect_input_stats(model, names, random_batches(images, batch, size, device), gram=True, call=family.forward)
    sync(device)
    with_grams = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for x in random_batches(images, batch, size, device):
            family.forward(model, x)
    sync(device)
    forward = time.perf_counter() - t
    n = images * per_image
    print(f"Grams of {len(names)} layers ({gram_bytes / 2**30:.2f} GiB fp64) over {images} images × {per_image} tokens = {n} tokens, "
          f"batch {batch}, {next(model.parameters()).dtype} on {device}")
    print(f"collect_input_stats   : {with_grams:7.2f} s  {n / with_grams:12.0f} tokens/s")
    print(f"forward passes alone  : {forward:7.2f} s  {n / forward:12.0f} tokens/s")
    grams = max(with_grams - forward, 1e-9)
    print(f"Gram accumulation     : {grams:7.2f} s  {n / grams:12.0f} tokens/s (the difference; "
          f"{with_grams / forward:.2f}× the forward passes)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="deit_base_patch16_224")
    ap.add_argument("--recipe", default="deit")
    ap.add_argument("--kappa", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None, help="cpu, cuda[:N] or auto (default: the library's svd_device())")
    ap.add_argument("--gram-tokens", type=int, default=0, help="also time the whitened method's Grams over this many tokens")
    ap.add_argument("--gram-batch", type=int, default=256, help="images per calibration batch for --gram-tokens")
    args = ap.parse_args()
    device = svd_device() if args.device is None else resolve_device(args.device)
    use_svd_device(device)

    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False).eval()
    recipe = load_recipe(args.recipe).with_kappa(args.kappa)
    plans = [p for p in plan_layers(linear_candidates(model), recipe) if p.factorized]
    weights = [model.get_submodule(p.name).weight.detach() for p in plans]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    b, o = time_svd(model, weights, recipe, device, args.repeats)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{args.arch} κ={args.kappa:g}: {len(plans)} layers, SVDs on {device} ({where})")
    print(f"bare torch.linalg.svd : {b:7.3f} s (best of {args.repeats})")
    print(f"lowrank factorize     : {o:7.3f} s (best of {args.repeats})")
    print(f"ratio                 : {o / b:7.3f}x  (goal <= 1.15x)")
    print(f"peak RSS              : {rss / 1024:.0f} MiB (model + one deep copy: {rss0 / 1024:.0f} MiB before timing){gpu}")
    if args.gram_tokens:
        print()
        time_grams(model, [p.name for p in plans], args.gram_tokens, args.gram_batch, device)


if __name__ == "__main__":
    main()
