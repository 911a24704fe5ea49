"""A training run's folder: recipe, metrics, checkpoints, training state, final student, report.

```
runs/<name>/
  recipe.yaml                      the resolved recipe (what --resume checks against)
  run.json                         teacher, data, world size, baseline accuracies
  metrics.jsonl                    one JSON line per logged step: loss terms, lr, images/s
  checkpoint-000120.safetensors    the student at step 120 (lowrank manifest: `lowrank_cli.load` reads it)
  checkpoint-000120.state.safetensors  optimizer, grad scaler, position and RNG at step 120
  student.safetensors              the final student, same format as `lowrank factorize` writes
  report.json                      parameters, MACs, accuracies, recovery, timings
```

Everything is safetensors or JSON: nothing is pickled, so nothing is unpickled on resume.
A checkpoint counts once its state file exists (it is written second, atomically).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.atomic import atomic_output, write_json, write_text
from lowrank_cli.io.manifest import Manifest
from lowrank_cli.io.safetensors import read_header, save_checkpoint
from lowrank_cli.recipe import Recipe

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.safetensors$")
# recipe keys that may change on --resume without changing what the run computes so far
RESUMABLE_CHANGES = {("distill", "epochs"), ("distill", "max_steps"), ("distill", "log_every"),
                     ("distill", "checkpoint_every"), ("distill", "keep_checkpoints"), ("data", "num_workers")}


@dataclass
class Position:
    """Where training stands: optimizer steps done, and micro-batches consumed in `epoch`."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class TrainingState:
    """What a resumed run needs besides the weights: optimizer, scaler, position and RNG."""

    position: Position
    optimizer: dict[str, Any]
    scaler: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """The files of one run under `root` (see the module doc). Only rank 0 writes them."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.recipe_file = self.root / "recipe.yaml"
        self.run_file = self.root / "run.json"
        self.metrics_file = self.root / "metrics.jsonl"
        self.report_file = self.root / "report.json"
        self.student_file = self.root / "student.safetensors"

    # -- checks, before anything is written ------------------------------------------------
    def check_new(self) -> None:
        """A fresh run may go here: no run yet, and nothing else in the folder."""
        if self.run_file.exists() or self.checkpoints():
            raise LowrankError(f"{self.root}: already holds a run; resume it (resume=True), or choose another output folder", param="resume")
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise LowrankError(f"{self.root}: exists and is not an empty folder; choose another output folder", param="out")

    def check_resumable(self, recipe: Recipe) -> tuple[Path, Path]:
        """The latest complete checkpoint (student, state) of a run of this same recipe."""
        if not self.run_file.exists() or not self.recipe_file.exists():
            raise LowrankError(f"{self.root}: no run to resume here (no run.json); start it without resuming", param="resume")
        latest = self.latest()
        if latest is None:
            raise LowrankError(f"{self.root}: the run has no complete checkpoint yet; start it again, without resuming, in a new output folder", param="resume")
        saved = yaml.safe_load(self.recipe_file.read_text()) or {}
        diff = _differences(saved, recipe.to_dict())
        if diff:
            key, was, now = diff[0]
            raise LowrankError(
                f"{self.root}: holds a run of another recipe ('{saved.get('name')}', {key} = {was!r}, now {now!r}); "
                "resume with the same recipe and options, or choose another output folder"
            )
        return latest

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path, Path]]:
        """(step, student file, state file) of each complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _CHECKPOINT.match(p.name)
            state = p.with_name(p.name.replace(".safetensors", ".state.safetensors"))
            if m and state.exists():
                found.append((int(m.group(1)), p, state))
        return sorted(found)

    def latest(self) -> tuple[Path, Path] | None:
        found = self.checkpoints()
        return (found[-1][1], found[-1][2]) if found else None

    def save_checkpoint(self, pos: Position, student_state: dict[str, torch.Tensor], manifest: Manifest,
                        optimizer: torch.optim.Optimizer, scaler: Any, rng: dict[str, Any], keep: int) -> Path:
        """Write the student and the training state at `pos`, then keep only the last `keep`."""
        student = self.root / f"checkpoint-{pos.step:06d}.safetensors"
        state = student.with_name(student.name.replace(".safetensors", ".state.safetensors"))
        at_step = manifest.replace(distill={**(manifest.distill or {}), "step": pos.step})
        save_checkpoint(student, student_state, at_step.metadata(), force=True)
        save_training_state(state, TrainingState(pos, optimizer.state_dict(), scaler.state_dict() if scaler.is_enabled() else {}, rng))
        for _, old, old_state in self.checkpoints()[:-keep]:
            old_state.unlink(missing_ok=True)  # the state first: a student without a state is no checkpoint
            old.unlink(missing_ok=True)
        return student

    # -- the rest ----------------------------------------------------------------------------
    def create(self, recipe: Recipe, run_info: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(self.recipe_file, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        write_json(self.run_file, run_info)

    def run_info(self) -> dict[str, Any]:
        return json.loads(self.run_file.read_text())

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")


def _differences(saved: Any, now: Any, path: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            if path + (k,) not in RESUMABLE_CHANGES:
                out += _differences(saved.get(k), now.get(k), path + (k,))
        return out
    return [] if saved == now else [(".".join(path), saved, now)]


def save_training_state(path: Path, state: TrainingState) -> None:
    """Optimizer tensors and RNG states as safetensors; everything else as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    opt_state: dict[str, dict[str, Any]] = {}
    for idx, per_param in state.optimizer["state"].items():
        opt_state[str(idx)] = {}
        for k, v in per_param.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_state[str(idx)][k] = v
    rng = dict(state.rng)
    tensors["rng.torch"] = rng.pop("torch")
    for i, s in enumerate(rng.pop("cuda", [])):
        tensors[f"rng.cuda.{i}"] = s
    py = rng.pop("python", None)
    npy = rng.pop("numpy", None)
    meta = {
        "position": vars(state.position),
        "param_groups": state.optimizer["param_groups"],
        "optimizer_scalars": opt_state,
        "scaler": state.scaler,
        "python_rng": [py[0], list(py[1]), py[2]] if py else None,
        "numpy_rng": [npy[0], npy[1].tolist(), *npy[2:]] if npy else None,
    }
    with atomic_output(path, force=True) as tmp:
        save_file(tensors, str(tmp), metadata={"training_state": json.dumps(meta)})


def load_training_state(path: Path) -> TrainingState:
    """The inverse of `save_training_state` (safetensors and JSON only: no unpickling)."""
    header = read_header(path)
    try:
        meta = json.loads(header.metadata["training_state"])
    except (KeyError, json.JSONDecodeError):
        raise LowrankError(f"{path}: not a lowrank training state (no 'training_state' metadata)") from None
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["optimizer_scalars"].items()}
    rng: dict[str, Any] = {}
    cuda: dict[int, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
        elif name == "rng.torch":
            rng["torch"] = t
        elif name.startswith("rng.cuda."):
            cuda[int(name.rsplit(".", 1)[1])] = t
    if cuda:
        rng["cuda"] = [cuda[i] for i in sorted(cuda)]
    if meta.get("python_rng"):
        v, s, g = meta["python_rng"]
        rng["python"] = (v, tuple(s), g)
    if meta.get("numpy_rng"):
        name, keys, *rest = meta["numpy_rng"]
        rng["numpy"] = (name, np.array(keys, dtype=np.uint32), *rest)
    optimizer = {"state": state, "param_groups": meta["param_groups"]}
    return TrainingState(Position(**meta["position"]), optimizer, meta.get("scaler") or {}, rng)
