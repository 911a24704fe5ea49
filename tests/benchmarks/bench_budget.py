"""Benchmark: rank allocation under a global budget vs uniform κ, at the same total parameters.

On the digits ViT, for each target fraction of the selected layers' parameters: the
greedy allocation (`rank_rule: budget`) against PELA's uniform κ rule at the largest
ranks that fit the same budget, both with plain SVD and with whitened SVD; prints the
parameters each keeps, the total truncation error it minimises and held-out top-1
before distillation and after the same PELA distillation budget (`--distill-epochs`, on the
1200 training images only; 0: none) for the targets in `--distill-targets`.
Run: python tests/benchmarks/bench_budget.py [--targets 0.5 0.25 0.125 0.08]
     [--distill-epochs 10] [--distill-targets 0.125 0.08]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _digits import accuracy, digits_split, digits_teacher, distill, distill_settings, input_grams, output_error, selected_names

from lowrank_cli.factorize import factorize_model
from lowrank_cli.recipe import recipe_from_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25, 0.125, 0.08])
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--distill-epochs", type=int, default=10, help="PELA distillation epochs per student (0: none)")
    ap.add_argument("--distill-targets", type=float, nargs="+", default=[0.125, 0.08],
                    help="the targets whose students are distilled (at 0.5 and 0.25 they are already at the dense accuracy)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    teacher = digits_teacher()
    xtr, ytr, xte, yte = digits_split(teacher)
    calib = list(xtr[: args.calib_samples].split(64))
    names = selected_names(teacher)
    g_test = input_grams(teacher, names, xte)
    base = sum(teacher.get_submodule(n).weight.numel() + teacher.get_submodule(n).bias.numel() for n in names)
    print(f"teacher: held-out top-1 {accuracy(teacher, xte, yte):.1%}; selected layers: {base} parameters")
    if args.distill_epochs > 0:
        print(distill_settings(args.distill_epochs, len(xtr)))
    print(f"\n{'target':>6} {'method':>8} {'rule':>17} | {'params kept':>11} {'rel. trunc. err':>15} {'held-out err':>12} {'top-1':>6} {'+KD':>6}")
    for target in args.targets:
        for method in ("svd", "whitened"):
            budget = copy.deepcopy(teacher)
            fac = {"method": method, "rank_rule": "budget", "target_params": target}
            a = factorize_model(budget, recipe_from_dict({"factorize": fac}), calibration=calib).allocation
            uniform = copy.deepcopy(teacher)
            factorize_model(uniform, recipe_from_dict({"factorize": {"method": method, "kappa": a.uniform_kappa}}), calibration=calib)
            # and the allocation at exactly the uniform rule's parameters (it often keeps a little less)
            same = copy.deepcopy(teacher)
            fac2 = {**fac, "target_params": a.uniform_cost / a.base_cost}
            b = factorize_model(same, recipe_from_dict({"factorize": fac2}), calibration=calib).allocation
            for label, m, cost, dropped in (
                ("budget", budget, a.cost, a.dropped),
                (f"uniform κ={a.uniform_kappa:g}", uniform, a.uniform_cost, a.uniform_dropped),
                ("budget @ uniform", same, b.cost, b.dropped),
            ):
                kept = sum(p.numel() for n in names for p in m.get_submodule(n).parameters())
                assert kept == cost, (kept, cost)
                held = sum(output_error(teacher, m, n, g_test[n]) for n in names) / len(names)
                before = accuracy(m, xte, yte)
                after = f"{'—':>6}"
                if args.distill_epochs > 0 and target in args.distill_targets:
                    t0 = time.perf_counter()
                    after = f"{accuracy(distill(m, teacher, xtr, ytr, args.distill_epochs), xte, yte):>6.1%} ({time.perf_counter() - t0:.0f} s)"
                print(f"{target:>6g} {method:>8} {label:>17} | {kept / base:>11.3f} {(dropped / a.energy) ** 0.5:>15.4f} "
                      f"{held:>12.4f} {before:>6.1%} {after}")
    print("\nrel. trunc. err = √(Σ dropped σ² / Σ σ²) over the selected layers (σ of W for svd, of W·S for whitened);"
          "\nheld-out err = mean over layers of ‖(W−W')X‖/‖WX‖ on the held-out images; top-1: before distillation;"
          "\n+KD: top-1 after the same PELA distillation budget (above), on the training images only.")


if __name__ == "__main__":
    main()
