"""Benchmark: uniform κ against allocation by measured sensitivity (`factorize.allocation: sensitivity`), at equal parameters.

Zero-shot (no distillation): each model is factorized twice at every κ, once by PELA's uniform κ
rule and once by sensitivity at uniform κ's parameter count, with each `--method`, and judged on
held-out data by its task, with the project's evaluation (`distill/evaluate.py`): top-1 for
images, mean (and minimum) cosine of the mean-pooled embeddings to the original's for text
encoders, perplexity for causal LMs (the original's figure is printed first).

- `--model-dir DIR`: a Hub folder (BERT-family encoder, GPT-2 / Llama causal LM, ViT); text
  from `--data` (default `pydoc`: calibration on its training part, figures on the held-out part),
  images from `--data` (an image folder).
- without it: the digits ViT of the other benchmarks (`_digits.py`, trained once and cached),
  calibrated on its training digits and judged on the 597 held-out ones.

ASVD at uniform ranks is refused for causal LMs (`factorize.check_method`); that cell prints the refusal.

Run: python tests/benchmarks/bench_allocation.py [--model-dir DIR] [--data pydoc] [--kappa 2 4]
     [--method svd whitened] [--calib-samples 256] [--select-exclude pooler lm_head ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lowrank_cli.distill.evaluate import evaluate
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize import factorize_model
from lowrank_cli.recipe import recipe_from_dict


def _digits_setup(calib_samples: int):
    from _digits import digits_split, digits_teacher

    from lowrank_cli.data import TensorImages
    from lowrank_cli.models import get_family

    teacher = digits_teacher()
    xtr, _ytr, xte, yte = digits_split(teacher)
    return teacher, get_family("timm"), list(xtr[:calib_samples].split(64)), TensorImages(xte, yte), "digits ViT"


def _hub_setup(folder: Path, data: str, calib_samples: int, max_length: int):
    from lowrank_cli.models import build_model
    from lowrank_cli.models.family import TextConfig
    from lowrank_cli.data.modality import calibration_for, load_data

    built = build_model(folder)
    model, family = built.model.eval(), built.family
    recipe = recipe_from_dict({"data": {"source": data, "max_length": max_length if isinstance(family.data_config(model), TextConfig) else None}})
    held_out = load_data(recipe, family, model, built.folder).val
    calib = calibration_for(data, family, model, built.folder, calib_samples, 32, recipe.data.max_length)
    return model, family, calib, held_out, built.architecture


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=None, help="a Hub folder (default: the digits ViT)")
    ap.add_argument("--data", default="pydoc", help="text source, or an image folder, for a Hub folder")
    ap.add_argument("--kappa", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--method", nargs="+", default=["svd", "whitened"], choices=["svd", "whitened", "asvd"])
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--select-exclude", nargs="*", default=None,
                    help="select.exclude patterns (default: the library's, plus pooler/classifier/lm_head/score for Hub folders)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.model_dir is None:
        dense, family, calib, held_out, label = _digits_setup(args.calib_samples)
        exclude = args.select_exclude
    else:
        dense, family, calib, held_out, label = _hub_setup(args.model_dir, args.data, args.calib_samples, args.max_length)
        exclude = args.select_exclude if args.select_exclude is not None else ["norm", "pooler", "classifier", "pre_classifier", "lm_head", "score", "head"]
    task = family.task(dense).name
    ref = evaluate(dense, held_out, family, teacher=dense, task=task)
    print(f"{label} ({task}): the original {ref.to_dict()}")
    print(f"{'method':>8} {'κ':>5} {'allocation':>11} | {'params':>10} {'primary':>9}  figures")
    rows = []
    for method in args.method:
        for kappa in args.kappa:
            for allocation in ("uniform", "sensitivity"):
                select = {} if exclude is None else {"exclude": exclude}
                recipe = recipe_from_dict({"select": select, "factorize": {"kappa": kappa, "method": method, "allocation": allocation}})
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                try:
                    result = factorize_model(model, recipe, family=family, calibration=calib)
                except LowrankError as e:  # ASVD at uniform ranks on a causal LM
                    print(f"{method:>8} {kappa:>5g} {allocation:>11} | refused: {e}")
                    rows.append({"method": method, "kappa": kappa, "allocation": allocation, "refused": str(e)})
                    continue
                seconds = time.perf_counter() - t0
                ev = evaluate(model, held_out, family, teacher=dense, task=task)
                params = sum(p.numel() for p in model.parameters())
                figures = {k: v for k, v in ev.to_dict().items() if v is not None}
                print(f"{method:>8} {kappa:>5g} {allocation:>11} | {params:>10,} {ev.primary():>9.4f}  {figures}  ({seconds:.1f}s)")
                a = result.allocation
                rows.append({"method": method, "kappa": kappa, "allocation": allocation, "params": params, "primary": ev.primary(),
                             "figures": figures, "seconds": seconds,
                             **({"ranks": a.ranks, "uniform_ranks": a.uniform_ranks, "sensitivity": a.sensitivity} if a else {})})
    if args.json is not None:
        args.json.write_text(json.dumps({"model": label, "task": task, "original": ref.to_dict(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
