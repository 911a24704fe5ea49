"""`lowrank demo`: the whole pipeline in about two minutes on 2 CPU cores, nothing downloaded.

1. Train a small ViT teacher on scikit-learn's handwritten digits (or reuse the one cached
   under `~/.cache/lowrank/`, keyed by its architecture and training settings).
2. Factorize it at κ = 3 (recipe `demo`) and evaluate the SVD-only student.
3. Distill the student against the teacher (PELA), evaluate it again, and report the
   fraction of the accuracy SVD lost that distillation recovered.

`method="pclora"` (recipe `demo-pclora`) compresses the same cached teacher to the same
ranks by PC-LoRA instead: adapters beside the dense weights, which fade out in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from lowrank_cli.io.atomic import atomic_output
from lowrank_cli.io.rundir import RunDir
from lowrank_cli.io.safetensors import read_header
from lowrank_cli.models.build import build_model
from lowrank_cli.models.family import get_family
from lowrank_cli.pipelines.compress import claimed, prepare_compress, run_distillation, with_run_options
from lowrank_cli.recipe import DistillConfig, Recipe, load_recipe

# How the teacher is trained: plain supervised training, same loop as distillation.
TEACHER_TRAINING = DistillConfig(epochs=40, batch_size=32, lr=2e-3, warmup_epochs=1, min_lr=1e-5, weight_decay=0.05,
                                 clip_grad=1.0, amp="none", seed=0, log_every=5)
TEACHER_LABEL_SMOOTHING = 0.1


def cache_dir() -> Path:
    """Where the demo teacher is cached: `$LOWRANK_CACHE`, else `~/.cache/lowrank`."""
    return Path(os.environ.get("LOWRANK_CACHE") or Path.home() / ".cache" / "lowrank")


def teacher_key(recipe: Recipe) -> str:
    settings = [recipe.model, recipe.model_kwargs, TEACHER_TRAINING.model_dump(), TEACHER_LABEL_SMOOTHING, timm.__version__]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_teacher(recipe: Recipe) -> tuple[Path, dict[str, Any]] | None:
    """The cached teacher and its training record, if it exists and loads strictly."""
    path = cache_dir() / f"demo-teacher-{teacher_key(recipe)}.safetensors"
    if not path.exists():
        return None
    try:
        build_model(path, recipe.model, recipe.model_kwargs)
        record = json.loads(read_header(path).metadata["lowrank_demo_teacher"])
    except (LowrankError, KeyError, json.JSONDecodeError):
        return None  # a damaged or foreign file: train again
    return path, record


def train_teacher(recipe: Recipe, device: torch.device, log: Callable[[dict], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Train the demo's ViT on the digits' train split and cache it as safetensors."""
    torch.manual_seed(TEACHER_TRAINING.seed)
    family = get_family("timm")
    model = family.create(recipe.model, recipe.model_kwargs)
    data = digits(family.data_config(model))
    result = train(model, SupervisedObjective(TEACHER_LABEL_SMOOTHING, family.forward), data.train, TEACHER_TRAINING, DistEnv(device=device), log=log)
    acc = evaluate(model, data.val, family, device)
    record = {"top1": acc.top1, "seconds": result.seconds, "epochs": TEACHER_TRAINING.epochs, "steps": result.steps}
    path = cache_dir() / f"demo-teacher-{teacher_key(recipe)}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": "pt", "lowrank_demo_teacher": json.dumps(record)})
    return path, record


def _clear_previous_demo(out: Path) -> None:
    run = RunDir(out)
    if not out.exists():
        return
    run.check_free()  # never delete a demo another process is running
    if run.run_file.exists() and run.recipe_file.exists() and "name: demo" in run.recipe_file.read_text():
        shutil.rmtree(out)  # our own previous demo run
        return
    if any(out.iterdir()):
        raise LowrankError(f"{out}: exists and does not hold a previous demo run; choose another output folder", param="out")


DEMO_RECIPES = {"pela": "demo", "pclora": "demo-pclora"}


def run_demo(out: Path, device: str = "auto", epochs: int | None = None, retrain: bool = False,
             teacher_log=None, log=None, note: Callable[[str], None] = lambda s: None, method: str = "pela") -> dict[str, Any]:
    """Run the demo (`method` pela or pclora); returns the compress report plus the teacher record and the wall time."""
    if method not in DEMO_RECIPES:
        raise LowrankError(f"method {method!r}: accepted: {', '.join(DEMO_RECIPES)}", param="method")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    recipe = with_run_options(load_recipe(DEMO_RECIPES[method]), epochs=epochs)
    cached = None if retrain else cached_teacher(recipe)
    if cached is None:
        note(f"training the teacher ({recipe.model}, {TEACHER_TRAINING.epochs} epochs on digits; cached in {cache_dir()})")
        cached = train_teacher(recipe, dev, teacher_log)
        teacher_path, record = cached
        record = {**record, "cached": False}
    else:
        teacher_path, record = cached
        record = {**record, "cached": True}
        note(f"reusing the teacher cached at {teacher_path}")
    _clear_previous_demo(out)
    prepared = prepare_compress(teacher_path, recipe, out=out, device=device, env=DistEnv(device=dev))
    with claimed(prepared):
        report = run_distillation(prepared, log=log, note=note)
    report["teacher_training"] = {**record, "file": str(teacher_path)}
    report["wall_seconds"] = time.perf_counter() - t0
    return report
