"""`lowrank demo`: the whole pipeline on real handwritten digits, over several seeds, nothing downloaded.

For each seed (0, 1, … by default five):

1. Train a small ViT teacher on scikit-learn's handwritten digits with that seed (or reuse the
   one cached under `~/.cache/lowrank/`, keyed by its architecture, training settings and seed).
2. Factorize it at κ = 4 (recipe `demo`) and evaluate the SVD-only student: at this κ, SVD
   alone loses 6 to 48 points of top-1 over seeds 0–4 (torch 2.14, timm 1.0.31), a loss that 360
   held-out images resolve (one image is 0.28 points).
3. Distill the student against the teacher (PELA) with the same seed, evaluate it again.

The report gives each seed's teacher, SVD-only and distilled top-1 and the fraction of the
loss that distillation recovered, and their median and range over the seeds.

`method="pclora"` (recipe `demo-pclora`) compresses the same cached teachers to the same
ranks by PC-LoRA instead: adapters beside the dense weights, which fade out in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from safetensors.torch import save_file

from lowrank_cli.data.images import digits
from lowrank_cli.device import resolve_device
from lowrank_cli.distill.distributed import DistEnv
from lowrank_cli.distill.evaluate import evaluate
from lowrank_cli.distill.objective import SupervisedObjective
from lowrank_cli.distill.train import train
from lowrank_cli.errors import LowrankError
from lowrank_cli.io.atomic import atomic_output, write_json
from lowrank_cli.io.rundir import RunDir
from lowrank_cli.io.safetensors import read_header
from lowrank_cli.models.build import build_model
from lowrank_cli.models.family import get_family
from lowrank_cli.pipelines.common.prepare import claimed, prepare_compress, with_run_options
from lowrank_cli.pipelines.common.run_loop import run_distillation
from lowrank_cli.recipe import DistillConfig, Recipe, load_recipe

# How the teacher is trained: plain supervised training, same loop as distillation (the seed is the demo's).
TEACHER_TRAINING = DistillConfig(epochs=40, batch_size=32, lr=2e-3, warmup_epochs=1, min_lr=1e-5, weight_decay=0.05,
                                 clip_grad=1.0, amp="none", seed=0, log_every=5)
DEFAULT_SEEDS = 5
TEACHER_LABEL_SMOOTHING = 0.1


def cache_dir() -> Path:
    """Where the demo teacher is cached: `$LOWRANK_CACHE`, else `~/.cache/lowrank`."""
    return Path(os.environ.get("LOWRANK_CACHE") or Path.home() / ".cache" / "lowrank")


def teacher_training(seed: int) -> DistillConfig:
    return TEACHER_TRAINING.model_copy(update={"seed": seed})


def teacher_key(recipe: Recipe, seed: int = 0) -> str:
    settings = [recipe.model, recipe.model_kwargs, teacher_training(seed).model_dump(), TEACHER_LABEL_SMOOTHING, timm.__version__]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def teacher_path(recipe: Recipe, seed: int = 0) -> Path:
    return cache_dir() / f"demo-teacher-{teacher_key(recipe, seed)}.safetensors"


def cached_teacher(recipe: Recipe, seed: int = 0) -> tuple[Path, dict[str, Any]] | None:
    """The cached teacher of `seed` and its training record, if it exists and loads strictly."""
    path = teacher_path(recipe, seed)
    if not path.exists():
        return None
    try:
        build_model(path, recipe.model, recipe.model_kwargs)
        record = json.loads(read_header(path).metadata["lowrank_demo_teacher"])
    except (LowrankError, KeyError, json.JSONDecodeError):
        return None  # a damaged or foreign file: train again
    return path, record


def train_teacher(recipe: Recipe, device: torch.device, log: Callable[[dict], None] | None = None, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Train the demo's ViT on the digits' train split with `seed` and cache it as safetensors."""
    cfg = teacher_training(seed)
    torch.manual_seed(cfg.seed)
    family = get_family("timm")
    model = family.create(recipe.model, recipe.model_kwargs)
    data = digits(family.data_config(model))
    result = train(model, SupervisedObjective(TEACHER_LABEL_SMOOTHING, family.forward), data.train, cfg, DistEnv(device=device), log=log)
    acc = evaluate(model, data.val, family, device)
    record = {"top1": acc.top1, "seconds": result.seconds, "epochs": cfg.epochs, "steps": result.steps, "seed": seed}
    path = teacher_path(recipe, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": "pt", "lowrank_demo_teacher": json.dumps(record)})
    return path, record


def _is_demo_run(folder: Path) -> bool:
    run = RunDir(folder)
    return run.run_file.exists() and run.recipe_file.exists() and "name: demo" in run.recipe_file.read_text()


def _clear_previous_demo(out: Path) -> None:
    """Remove a previous demo's runs from `out` (its seed-<k> folders and summary); refuse anything else there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LowrankError(f"{out}: is a file; choose another output folder", param="out")
    if _is_demo_run(out):  # a single-seed demo of an earlier version
        RunDir(out).check_free()
        shutil.rmtree(out)
        return
    seeds = [d for d in out.iterdir() if d.is_dir() and d.name.startswith("seed-")]
    for d in seeds:
        RunDir(d).check_free()  # never delete a demo another process is running
    others = [p for p in out.iterdir() if p not in seeds and p.name != SUMMARY_FILE]
    if others or not all(_is_demo_run(d) or not any(d.iterdir()) for d in seeds):
        raise LowrankError(f"{out}: exists and does not hold a previous demo run; choose another output folder", param="out")
    for d in seeds:
        shutil.rmtree(d)
    (out / SUMMARY_FILE).unlink(missing_ok=True)


DEMO_RECIPES = {"pela": "demo", "pclora": "demo-pclora"}
SUMMARY_FILE = "demo.json"


def seed_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each seed's teacher, SVD-only and distilled top-1, and the fraction of the loss recovered."""
    rows = []
    for r in reports:
        acc = r["accuracy"]
        rows.append({"seed": r["seed"], "teacher": acc["teacher"]["top1"], "svd": acc["svd"]["top1"], "distilled": acc["distilled"]["top1"],
                     "recovered": r["recovered_fraction"], "seconds": r["wall_seconds"], "teacher_cached": r["teacher_training"]["cached"]})
    return rows


def spread(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max over the seeds of each figure."""
    out = {}
    for key in ("teacher", "svd", "distilled", "recovered"):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def run_demo(out: Path, device: str = "auto", epochs: int | None = None, retrain: bool = False, seeds: int = DEFAULT_SEEDS,
             teacher_log=None, log=None, note: Callable[[str], None] = lambda s: None, method: str = "pela") -> dict[str, Any]:
    """Run the demo (`method` pela or pclora) for seeds 0 … `seeds` − 1; returns the first seed's compress report
    with every seed's figures (`seeds`) and their median and range (`spread`), and writes it to `out/demo.json`."""
    if method not in DEMO_RECIPES:
        raise LowrankError(f"method {method!r}: accepted: {', '.join(DEMO_RECIPES)}", param="method")
    if seeds < 1:
        raise LowrankError(f"seeds must be at least 1 (got {seeds})", param="seeds")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    base = with_run_options(load_recipe(DEMO_RECIPES[method]), epochs=epochs)
    _clear_previous_demo(out)
    reports = []
    for seed in range(seeds):
        reports.append(_one_seed(out / f"seed-{seed}", base, seed, dev, device, retrain, teacher_log, log, note))
    report = {**reports[0], "kappa": base.factorize.kappa, "seeds": seed_rows(reports), "spread": spread(seed_rows(reports)),
              "wall_seconds": time.perf_counter() - t0}
    write_json(out / SUMMARY_FILE, report)
    return report


def _one_seed(out: Path, base: Recipe, seed: int, dev: torch.device, device: str, retrain: bool, teacher_log, log, note) -> dict[str, Any]:
    t0 = time.perf_counter()
    recipe = base.model_copy(update={"distill": base.distill.model_copy(update={"seed": seed})})
    cached = None if retrain else cached_teacher(recipe, seed)
    if cached is None:
        note(f"seed {seed}: training the teacher ({recipe.model}, {TEACHER_TRAINING.epochs} epochs on digits; cached in {cache_dir()})")
        path, record = train_teacher(recipe, dev, teacher_log, seed)
        record = {**record, "cached": False}
    else:
        path, record = cached
        record = {**record, "cached": True}
        note(f"seed {seed}: reusing the teacher cached at {path}")
    prepared = prepare_compress(path, recipe, out=out, device=device, env=DistEnv(device=dev))
    with claimed(prepared):
        report = run_distillation(prepared, log=log, note=note)
    return {**report, "seed": seed, "teacher_training": {**record, "file": str(path)}, "wall_seconds": time.perf_counter() - t0}
