"""Benchmark: latency of factorized vs dense models, eager PyTorch and onnxruntime, in one run.

Factorizes `--arch` (random weights: time does not depend on values) with a recipe at κ,
then runs `lowrank_cli.pipelines.bench.bench_checkpoint` for each runtime: the dense baseline (the
same model merged back, W = up·down) and the factorized model are timed interleaved after
warm-up. Prints measured speedup, the ideal one (MAC ratio) and efficiency = measured/ideal.

    python tests/benchmarks/bench_latency.py                                   # deit_base_patch16_224, κ=2, batch 8
    python tests/benchmarks/bench_latency.py --arch swin_base_patch4_window7_224 --all-linears --layers
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lowrank_cli.pipelines.bench import bench_checkpoint
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe, recipe_from_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="deit_base_patch16_224")
    ap.add_argument("--recipe", default="deit")
    ap.add_argument("--kappa", type=float, default=2.0)
    ap.add_argument("--all-linears", action="store_true", help="factorize every linear but norm/head/patch_embed")
    ap.add_argument("--checkpoint", type=Path, help="an existing factorized checkpoint instead of factorizing --arch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--layers", action="store_true", help="also time each factorized layer against its dense shape")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            recipe = load_recipe(args.recipe).with_kappa(args.kappa)
            if args.all_linears:
                data = recipe.to_dict()
                data["select"] = {**data["select"], "exclude": ["norm", "head", "patch_embed"], "overrides": []}
                recipe = recipe_from_dict(data, "all-linears")
            torch.manual_seed(0)
            t = time.perf_counter()
            ckpt = factorize_checkpoint(None, recipe, Path(tmp) / "model.safetensors", args.arch).out
            print(f"factorized {args.arch} at κ={args.kappa:g} in {time.perf_counter() - t:.0f} s")
        for threads in args.threads:
            for runtime in args.runtimes:
                r = bench_checkpoint(ckpt, batch=args.batch, threads=threads, runtime=runtime, layers=args.layers, repeats=args.repeats)
                print(f"{runtime:12s} batch {r.batch} threads {r.threads}: dense {r.dense.median_s * 1e3:8.1f} ms "
                      f"(IQR {r.dense.iqr_s * 1e3:.1f}), factorized {r.factorized.median_s * 1e3:8.1f} ms "
                      f"(IQR {r.factorized.iqr_s * 1e3:.1f}) -> speedup {r.speedup:.2f}x, ideal {r.ideal_speedup:.2f}x, "
                      f"efficiency {r.efficiency:.0%}", flush=True)
                if r.layers:
                    seen = set()
                    for lt in r.layers:
                        key = (lt.d_in, lt.d_out, lt.rank, lt.tokens)
                        if key in seen:
                            continue
                        seen.add(key)
                        same = sum((l.d_in, l.d_out, l.rank, l.tokens) == key for l in r.layers)
                        print(f"    {lt.d_in:5d}->{lt.d_out:<5d} r={lt.rank:<4d} rows={lt.batch * lt.tokens:<6d} x{same:<3d} "
                              f"dense {lt.dense_s * 1e3:7.2f} ms  factorized {lt.factorized_s * 1e3:7.2f} ms  "
                              f"speedup {lt.speedup:.2f}x (ideal {lt.ideal_speedup:.2f}x){'  SLOWER' if lt.slower else ''}")


if __name__ == "__main__":
    main()
