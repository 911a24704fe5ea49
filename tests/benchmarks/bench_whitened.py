"""Benchmark: whitened (and ASVD) factorization vs plain SVD on a ViT trained on digits.

In one run, on the same model and the same ranks (κ rule): the per-layer output error
`‖(W − W')X‖ / ‖W X‖` on the calibration inputs and on held-out inputs, and top-1 on the
held-out digits before any distillation and after the same PELA distillation budget
(`--distill-epochs`, on the 1200 training images only; 0: none) for the κ in `--distill-kappa` (default: all).
Calibration: 256 training images.
Run: python tests/benchmarks/bench_whitened.py [--kappa 2 4 8 16] [--calib-samples 256]
     [--distill-epochs 10] [--distill-kappa 8 16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _digits import accuracy, digits_split, digits_teacher, distill, distill_settings, input_grams, output_error, selected_names

from lowrank_cli.factorize import factorize_model
from lowrank_cli.recipe import recipe_from_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kappa", type=float, nargs="+", default=[2.0, 4.0, 8.0, 16.0])
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--distill-epochs", type=int, default=10, help="PELA distillation epochs per student (0: none)")
    ap.add_argument("--distill-kappa", type=float, nargs="+", default=None, help="the κ whose students are distilled (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    teacher = digits_teacher()
    xtr, ytr, xte, yte = digits_split(teacher)
    calib = list(xtr[: args.calib_samples].split(64))
    names = selected_names(teacher)
    g_cal, g_test = input_grams(teacher, names, xtr[: args.calib_samples]), input_grams(teacher, names, xte)
    print(f"teacher: held-out top-1 {accuracy(teacher, xte, yte):.1%} ({len(xte)} images); calibration: {args.calib_samples} training images")

    acc_rows = []
    for kappa in args.kappa:
        models = {}
        for method in ("svd", "whitened", "asvd"):
            m = copy.deepcopy(teacher)
            factorize_model(m, recipe_from_dict({"factorize": {"method": method, "kappa": kappa}}), calibration=calib)
            models[method] = m
        show = kappa == args.kappa[0]  # the per-layer table for the first κ, the means for all
        print(f"\nκ = {kappa:g}: {'per-layer' if show else 'mean'} output error ‖(W−W')X‖/‖WX‖ at the same ranks")
        print(f"{'layer':<20} {'rank':>4} | {'calib svd':>9} {'whitened':>9} {'asvd':>9} | {'held-out svd':>12} {'whitened':>9} {'asvd':>9}")
        worse = 0
        summary = {k: {"cal": [], "test": []} for k in models}
        for name in names:
            rank = models["svd"].get_submodule(name).rank
            cal = {k: output_error(teacher, m, name, g_cal[name]) for k, m in models.items()}
            test = {k: output_error(teacher, m, name, g_test[name]) for k, m in models.items()}
            worse += cal["whitened"] > cal["svd"] * (1 + 1e-6)
            for k in models:
                summary[k]["cal"].append(cal[k])
                summary[k]["test"].append(test[k])
            if show:
                print(f"{name:<20} {rank:>4} | {cal['svd']:>9.4f} {cal['whitened']:>9.4f} {cal['asvd']:>9.4f} | "
                      f"{test['svd']:>12.4f} {test['whitened']:>9.4f} {test['asvd']:>9.4f}")
        mean = {k: (statistics.mean(v["cal"]), statistics.mean(v["test"])) for k, v in summary.items()}
        print(f"{'mean':<20} {'':>4} | {mean['svd'][0]:>9.4f} {mean['whitened'][0]:>9.4f} {mean['asvd'][0]:>9.4f} | "
              f"{mean['svd'][1]:>12.4f} {mean['whitened'][1]:>9.4f} {mean['asvd'][1]:>9.4f}")
        print(f"layers where whitened is worse than plain SVD on the calibration inputs: {worse} of {len(names)}")
        before = {k: accuracy(m, xte, yte) for k, m in models.items()}
        after = {}
        if args.distill_epochs > 0 and (args.distill_kappa is None or kappa in args.distill_kappa):
            for k, m in models.items():
                t0 = time.perf_counter()
                after[k] = accuracy(distill(m, teacher, xtr, ytr, args.distill_epochs), xte, yte)
                print(f"distilled κ={kappa:g} {k}: {before[k]:.1%} -> {after[k]:.1%} ({time.perf_counter() - t0:.0f} s)")
        acc_rows.append((kappa, before, after))

    print("\nheld-out top-1 before distillation / after the same distillation budget")
    if args.distill_epochs > 0:
        print(distill_settings(args.distill_epochs, len(xtr)))
    print(f"{'κ':>4} | {'dense':>6} | {'svd':>6} {'whitened':>8} {'asvd':>6} | {'svd+KD':>7} {'whit.+KD':>8} {'asvd+KD':>7}")
    dense = accuracy(teacher, xte, yte)
    for kappa, acc, aft in acc_rows:
        post = " ".join(f"{aft[k]:>{w}.1%}" if k in aft else f"{'—':>{w}}" for k, w in (("svd", 7), ("whitened", 8), ("asvd", 7)))
        print(f"{kappa:>4g} | {dense:>6.1%} | {acc['svd']:>6.1%} {acc['whitened']:>8.1%} {acc['asvd']:>6.1%} | {post}")


if __name__ == "__main__":
    main()
