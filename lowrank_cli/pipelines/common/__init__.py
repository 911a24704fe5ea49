"""The pipelines' one shared home: what several commands use, so that no command module imports another.

This module: finding the model a command works on, default output paths, a factorized
checkpoint's manifest. Beside it: `inspection` (what `inspect` and `factorize` report, and the
weight-only path), and the distillation run that `compress`, `distill` and `demo` share, in
three parts: `prepare` (every input checked, teacher, student and data built, nothing written),
`run_loop` (the training run: baseline, local stage, training, the final student) and `report`
(the report a run writes).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.manifest import Manifest
from lowrank_cli.io.safetensors import INDEX_SUFFIX, CheckpointHeader, read_header, sha256_file
from lowrank_cli.models.build import ArchitectureHint
from lowrank_cli.plan.select import LayerPlan, manifest_layers
from lowrank_cli.recipe import Recipe, parse_size

RUNS_DIR = Path("runs")
STUDENT_FILE = "student.safetensors"


def hint_of(recipe: Recipe) -> ArchitectureHint:
    """Where a recipe says to look for a checkpoint's architecture: its `model`, then its `architectures` patterns."""
    return ArchitectureHint(recipe.model, dict(recipe.model_kwargs), tuple(recipe.architectures))


def output_beside(path: Path, suffix: str) -> Path:
    """`<stem><suffix>` beside `path` (`.safetensors` dropped from the stem): `deit.safetensors` → `deit.lowrank.safetensors`."""
    return path.with_name(path.name.removesuffix(".safetensors") + suffix)


def _has_manifest(path: Path) -> bool:
    try:
        return Manifest.from_header(read_header(path)) is not None
    except LowrankError:
        return False


def checkpoint_in_run(run: Path) -> Path:
    """The checkpoint a run directory holds: `student.safetensors`, else a factorized folder in shards (the folder, whose
    index holds the manifest), else its newest factorized `*.safetensors`."""
    student = run / STUDENT_FILE
    if student.is_file():
        return student
    if (run / f"model{INDEX_SUFFIX}").is_file() and _has_manifest(run):
        return run
    candidates = sorted((p for p in run.glob("*.safetensors") if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        if _has_manifest(p):
            return p
    raise LowrankError(f"{run}: no {STUDENT_FILE} and no factorized *.safetensors (one with a lowrank manifest) in this run directory")


def resolve_model_path(model: str | os.PathLike | None, runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    """A checkpoint file as given; a run directory's checkpoint; or, with None, the newest run's under `runs_dir`."""
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise LowrankError(f"{path}: no such file or run directory")
        return checkpoint_in_run(path) if path.is_dir() else path
    runs = Path(runs_dir)
    if not runs.is_dir():
        raise LowrankError(f"no model given and no {runs}/ directory here; give a factorized checkpoint or a run directory", param="model_path")
    dirs = sorted((d for d in runs.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs:
        with contextlib.suppress(LowrankError):
            return checkpoint_in_run(d)
    raise LowrankError(f"no model given and no run under {runs}/ holds a {STUDENT_FILE} or a factorized checkpoint", param="model_path")


def require_manifest(path: Path, purpose: str, need_architecture: bool) -> tuple[CheckpointHeader, Manifest]:
    """The header and manifest of a factorized checkpoint, or a sentence saying why it is not one."""
    header = read_header(path)
    manifest = Manifest.from_header(header)
    if manifest is None:
        raise LowrankError(f"{path}: is not a factorized checkpoint (no lowrank manifest); {purpose} needs the output of `lowrank factorize` or of a training run")
    if need_architecture and manifest.weight_only:
        raise LowrankError(
            f"{path}: was factorized weight-only (no architecture recorded), so {purpose} cannot build it; "
            "export it as dense or safetensors"
        )
    return header, manifest


def build_manifest(arch: str | None, family: str | None, model_kwargs: dict[str, Any], plans: list[LayerPlan], recipe: Recipe,
                   source: str | os.PathLike | None, method: str = "svd", latency: dict[str, Any] | None = None,
                   allocation=None) -> Manifest:
    """The manifest of a checkpoint factorized from `source` by `recipe` (with `latency` when latency-aware, and the
    `allocation` (`plan.Allocation`) when it was weighted by sensitivity)."""
    record = allocation.manifest_record() if allocation is not None and allocation.allocation == "sensitivity" else None
    return Manifest(
        layers=manifest_layers(plans, method), architecture=arch, family=family, model_kwargs=model_kwargs, recipe=recipe.to_dict(),
        source=None if source is None else {"file": Path(source).name, "sha256": sha256_file(source)}, latency=latency, allocation=record,
    )


def with_max_memory(recipe: Recipe, max_memory: str | None) -> Recipe:
    """A copy with `factorize.max_memory` set (None: the recipe as it is)."""
    if max_memory is None:
        return recipe
    try:
        parse_size(max_memory)
    except ValueError as e:
        raise LowrankError(f"max_memory '{max_memory}': {e}", param="max_memory") from None
    recipe = recipe.model_copy(deep=True)
    recipe.factorize = recipe.factorize.model_copy(update={"max_memory": str(max_memory)})
    return recipe


def recovered_fraction(teacher: float | None, svd: float | None, distilled: float | None) -> float | None:
    """(distilled − svd) / (teacher − svd): the share of what SVD lost that distillation won back.

    The figures are the task's primary ones, larger better (`Evaluation.primary`): top-1, the
    mean embedding cosine to the teacher, or −log perplexity.
    """
    if teacher is None or svd is None or distilled is None or teacher - svd <= 1e-12:
        return None
    return (distilled - svd) / (teacher - svd)
