"""Benchmark: `lowrank demo` over several seeds, the per-seed table behind the README's median and range.

Each seed trains its own teacher (or reuses the cached one) and distils with the same seed;
prints teacher / SVD-only / distilled top-1 on the 360 held-out digits, the fraction of the
loss recovered, the median and range over the seeds, and whether every seed reaches the goal
(≥ 90 % recovered, SVD losing ≥ 10 points).

    python tests/benchmarks/bench_demo_seeds.py [--seeds 5] [--method pela|pclora] [--retrain]
    python tests/benchmarks/bench_demo_seeds.py --first-seed 5 --recipe my-demo.yaml   # other seeds, a changed recipe
    python tests/benchmarks/bench_demo_seeds.py --errors   # also: the held-out digits teacher and student disagree on

`--errors` lists, per seed, each held-out digit that one of teacher and distilled student gets right and the other
wrong, with the teacher's margin there (its top probability minus its second) and that margin's rank among all 360
digits (1: the least sure): whether the digits a seed loses are ones the teacher itself is unsure of.

With `--first-seed` or `--recipe` (a copy of `recipes/demo.yaml` with one setting changed) the seeds run one by one
the way `lowrank demo` runs each, for seeds first-seed … first-seed + seeds − 1: how the demo's learning rates were
compared over seeds 0–9 (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lowrank_cli.data.images import digits
from lowrank_cli.models.build import build_model
from lowrank_cli.models.timm_family import TimmFamily
from lowrank_cli.pipelines.demo import DEMO_RECIPES, _one_seed, run_demo, seed_rows, spread, teacher_path
from lowrank_cli.recipe import Recipe, load_recipe


def disagreements(recipe: Recipe, seed: int, student_file: Path) -> None:
    """Print the held-out digits one of teacher and student of `seed` gets right and the other wrong, with the teacher's margin and its rank."""
    teacher = build_model(teacher_path(recipe, seed), recipe.model, recipe.model_kwargs).model.eval()
    student = build_model(student_file).model.eval()
    val = digits(TimmFamily().data_config(teacher)).val
    x, y = val.images, val.labels
    with torch.no_grad():
        pt, ps = teacher(x).softmax(-1), student(x).softmax(-1)
    top = pt.topk(2, -1).values
    margin = top[:, 0] - top[:, 1]
    rank = margin.argsort().argsort()  # 0: the digit the teacher is least sure of
    t_pred, s_pred = pt.argmax(-1), ps.argmax(-1)
    lost = ((t_pred == y) & (s_pred != y)).nonzero().flatten().tolist()
    won = ((t_pred != y) & (s_pred == y)).nonzero().flatten().tolist()
    both = ((t_pred != y) & (s_pred != y)).sum().item()
    print(f"  wrong: teacher {(t_pred != y).sum().item()}, student {(s_pred != y).sum().item()} ({both} by both); "
          f"lost {len(lost)}, won {len(won)}; teacher's median margin {margin.median():.2f}")
    for kind, ids in (("lost", lost), ("won", won)):
        for i in ids:
            print(f"    {kind} #{i}: label {y[i].item()}, teacher {t_pred[i].item()} (margin {margin[i]:.2f}, "
                  f"rank {rank[i].item() + 1} of {len(y)} from the least sure), student {s_pred[i].item()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--method", default="pela")
    ap.add_argument("--retrain", action="store_true", help="train the teachers again even if cached")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--recipe", help="a recipe file in place of the demo's")
    ap.add_argument("--errors", action="store_true", help="list the held-out digits teacher and student disagree on")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe or DEMO_RECIPES[args.method])
        as_the_demo = args.first_seed == 0 and args.recipe is None
        folder = Path(tmp) / "demo" if as_the_demo else Path(tmp)
        if as_the_demo:
            report = run_demo(folder, device="cpu", seeds=args.seeds, retrain=args.retrain, method=args.method, note=print)
        else:
            t0 = time.perf_counter()
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            reports = [_one_seed(folder / f"seed-{s}", recipe, s, torch.device("cpu"), "cpu", args.retrain, None, None, print) for s in seeds]
            report = {"kappa": recipe.factorize.kappa, "seeds": seed_rows(reports), "spread": spread(seed_rows(reports)),
                      "wall_seconds": time.perf_counter() - t0}
        if args.errors:
            for r in report["seeds"]:
                print(f"seed {r['seed']}:")
                disagreements(recipe, r["seed"], folder / f"seed-{r['seed']}" / "student.safetensors")
    print(f"\nlowrank demo ({args.method}), κ = {report['kappa']:g}, {torch.get_num_threads()} threads, {report['wall_seconds']:.0f} s")
    print(f"{'seed':>4} {'teacher':>8} {'SVD only':>9} {'distilled':>10} {'lost':>6} {'recovered':>10} {'seconds':>8}")
    for r in report["seeds"]:
        print(f"{r['seed']:>4} {r['teacher']:8.1%} {r['svd']:9.1%} {r['distilled']:10.1%} {r['teacher'] - r['svd']:6.1%} "
              f"{r['recovered']:10.0%} {r['seconds']:8.0f}{' (cached teacher)' if r['teacher_cached'] else ''}")
    sp = report["spread"]
    for key in ("median", "min", "max"):
        print(f"{key:>4} {sp['teacher'][key]:8.1%} {sp['svd'][key]:9.1%} {sp['distilled'][key]:10.1%} {'':>6} {sp['recovered'][key]:10.0%}")
    ok = all(r["recovered"] >= 0.9 and r["teacher"] - r["svd"] >= 0.1 for r in report["seeds"])
    print(f"goal (every seed: SVD loses >= 10 points, >= 90 % recovered): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
