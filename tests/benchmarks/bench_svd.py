"""Benchmark: lowrank's factorization of deit_base_patch16_224 at κ = 2 vs bare torch.linalg.svd.

Both run in this process on the same matrices; prints seconds, the ratio (goal: ≤ 1.15×)
and peak resident memory. Run: python tests/benchmarks/bench_svd.py [--arch ARCH] [--kappa K]
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import timm
import torch

from lowrank_cli.decompose import svd_device
from lowrank_cli.factorize import factorize_model
from lowrank_cli.models import linear_candidates
from lowrank_cli.plan import plan_layers
from lowrank_cli.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="deit_base_patch16_224")
    ap.add_argument("--recipe", default="deit")
    ap.add_argument("--kappa", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False).eval()
    recipe = load_recipe(args.recipe).with_kappa(args.kappa)
    plans = [p for p in plan_layers(linear_candidates(model), recipe) if p.factorized]
    weights = [model.get_submodule(p.name).weight.detach() for p in plans]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    bare, ours = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        t = time.perf_counter()
        for w in weights:
            torch.linalg.svd(w.to(svd_device()).float(), full_matrices=False)
        bare.append(time.perf_counter() - t)
        m = copy.deepcopy(model)
        t = time.perf_counter()
        factorize_model(m, recipe)
        ours.append(time.perf_counter() - t)
        del m
    b, o = min(bare), min(ours)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{args.arch} κ={args.kappa:g}: {len(plans)} layers, device {svd_device()}, {torch.get_num_threads()} threads")
    print(f"bare torch.linalg.svd : {b:7.2f} s (best of {args.repeats})")
    print(f"lowrank factorize     : {o:7.2f} s (best of {args.repeats})")
    print(f"ratio                 : {o / b:7.3f}x  (goal <= 1.15x)")
    print(f"peak RSS              : {rss / 1024:.0f} MiB (model + one deep copy: {rss0 / 1024:.0f} MiB before timing)")


if __name__ == "__main__":
    main()
