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

While a process writes a run, the folder holds `.lock` (its pid, host and start time): a
second process refuses the folder and names the first; a lock whose process is gone (a crash,
`kill -9`) is taken over. A run that fails before its first complete checkpoint is removed; one
that fails later stays resumable. Resuming removes the temporary files of interrupted writes and
cuts `metrics.jsonl` back to the checkpoint's step, so a resumed run's metrics equal an
uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.atomic import atomic_output, write_json, write_text
from lowrank_cli.io.hub import SIDE_FILES
from lowrank_cli.io.manifest import Manifest, save_factorized
from lowrank_cli.io.safetensors import read_header
from lowrank_cli.recipe import Recipe

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)(\.state)?\.safetensors$")
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # what atomic_output leaves behind when a process is killed mid-write
LOCK_FILE = ".lock"
LOCK_ENV = "LOWRANK_RUN_LOCK"  # the token of a lock held by a parent (`--nproc`) for the processes it starts
# recipe keys that may change on --resume without changing what the run computes so far
RESUMABLE_CHANGES = {("factorize", "max_memory"), ("distill", "epochs"), ("distill", "max_steps"), ("distill", "log_every"),
                     ("distill", "checkpoint_every"), ("distill", "keep_checkpoints"), ("data", "num_workers"), ("description",)}


@dataclass
class Position:
    """Where training stands: optimizer steps done, and micro-batches consumed in `epoch`; for streamed text, also
    where the stream stands in `epoch` (`data.stream.StreamState` as a dict of JSON scalars; None at an epoch's start)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    stream: dict[str, Any] | None = None


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
        self.lock_file = self.root / LOCK_FILE
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
        if self.root.exists() and (not self.root.is_dir() or any(p.name != LOCK_FILE for p in self.root.iterdir())):
            raise LowrankError(f"{self.root}: exists and is not an empty folder; choose another output folder", param="out")

    def check_resumable(self, recipe: Recipe) -> tuple[Path, Path]:
        """The latest complete checkpoint (student, state) of a run of this same recipe."""
        if not self.run_file.exists() or not self.recipe_file.exists():
            raise LowrankError(f"{self.root}: no run to resume here (no run.json); start it without resuming", param="resume")
        latest = self.latest()
        if latest is None:
            raise LowrankError(f"{self.root}: the run has no complete checkpoint yet; start it again, without resuming, in a new output folder", param="resume")
        self.check_same_recipe(recipe)
        return latest

    def check_same_recipe(self, recipe: Recipe) -> None:
        """A LowrankError unless the run in this folder was started with `recipe` (up to the keys a resume may change)."""
        if not self.run_file.exists() or not self.recipe_file.exists():
            raise LowrankError(f"{self.root}: no run to resume here (no run.json); start it without resuming", param="resume")
        saved = yaml.safe_load(self.recipe_file.read_text()) or {}
        if isinstance(saved.get("distill"), dict):
            saved["distill"].setdefault("strategy", "ddp")  # runs from before distill.strategy existed trained with DDP
            saved["distill"].setdefault("group_by_length", False)  # and drew their batches at random: resumable with `false`
            if isinstance(saved["distill"].get("local"), dict):  # from before distill.budget: the share had no use, its default
                saved["distill"]["local"].setdefault("budget_share", 0.3)
                saved["distill"]["local"].setdefault("min_steps", 20)
        diff = _differences(saved, recipe.to_dict())
        strategy = [(was, now) for key, was, now in diff if key == "distill.strategy"]
        if strategy:
            was, now = strategy[0]
            raise LowrankError(f"{self.root}: holds a run trained with distill.strategy '{was}', now '{now}'; its checkpoints resume with "
                               f"the strategy it started with ('{was}'), or start a new run in another output folder", param="strategy")
        if diff:
            key, was, now = diff[0]
            raise LowrankError(
                f"{self.root}: holds a run of another recipe ('{saved.get('name')}', {key} = {was!r}, now {now!r}); "
                "resume with the same recipe and options, or choose another output folder"
            )

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path, Path]]:
        """(step, student file, state file) of each complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _CHECKPOINT.match(p.name)
            state = p.with_name(p.name.replace(".safetensors", ".state.safetensors"))
            if m and not m.group(2) and state.exists():
                found.append((int(m.group(1)), p, state))
        return sorted(found)

    def latest(self) -> tuple[Path, Path] | None:
        found = self.checkpoints()
        return (found[-1][1], found[-1][2]) if found else None

    def save_checkpoint(self, pos: Position, student_state: dict[str, torch.Tensor], manifest: Manifest,
                        optimizer: torch.optim.Optimizer | dict[str, Any], scaler: Any, rng: dict[str, Any], keep: int) -> Path:
        """Write the student and the training state at `pos`, then keep only the last `keep`.

        `optimizer` is the optimizer or its whole state dict (under FSDP, gathered: `distill.fsdp.full_state`)."""
        student = self.root / f"checkpoint-{pos.step:06d}.safetensors"
        state = student.with_name(student.name.replace(".safetensors", ".state.safetensors"))
        at_step = manifest.replace(distill={**(manifest.distill or {}), "step": pos.step})
        save_factorized(student, student_state, at_step, force=True)
        optimizer_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        save_training_state(state, TrainingState(pos, optimizer_state, scaler.state_dict() if scaler.is_enabled() else {}, rng))
        for _, old, old_state in self.checkpoints()[:-keep]:
            old_state.unlink(missing_ok=True)  # the state first: a student without a state is no checkpoint
            old.unlink(missing_ok=True)
        return student

    # -- one writer at a time ----------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run folder's lock for the block (created with the folder if need be).

        Refuses, naming the holder, while another live process holds it; takes over a lock
        whose process is gone. Inside a block, processes started with the lock's token in
        their environment (`--nproc` relaunching under torchrun) share it.
        """
        token = os.environ.get(LOCK_ENV)
        if token and self._holder().get("token") == token:
            yield  # held by the process that started this one
            return
        created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LowrankError(f"{self.root}: cannot create the run folder ({e.strerror or e})", param="out") from None
        token = secrets.token_hex(8)
        self._acquire(token)
        previous = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = token
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = previous
            if self._holder().get("token") == token:
                self.lock_file.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    self.root.rmdir()  # only if nothing was written

    def check_free(self) -> None:
        """A LowrankError naming the process that holds this run's lock, if a live one does (and it is not our parent)."""
        holder = self._holder()
        if holder and holder.get("token") != os.environ.get(LOCK_ENV) and _alive(holder):
            raise LowrankError(f"{self.root}: another lowrank process (pid {holder.get('pid')} on {holder.get('host')}, started "
                               f"{holder.get('started')}) is writing this run; wait for it to finish, or choose another output folder "
                               f"(a stale lock is {self.lock_file})", param="out")

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.lock_file.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _acquire(self, token: str) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.datetime.now().isoformat(timespec="seconds"), "token": token}
        for _ in range(3):
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and not _alive(holder):  # a crashed run's lock: take it over
                    self.lock_file.unlink(missing_ok=True)
                    continue
                if holder:
                    self.check_free()
                raise LowrankError(f"{self.root}: another lowrank process is starting to write this run; wait for it to finish, "
                                   f"or choose another output folder (a stale lock is {self.lock_file})", param="out") from None
            except OSError as e:
                raise LowrankError(f"{self.root}: cannot create its lock file ({e.strerror or e})", param="out") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise LowrankError(f"{self.root}: could not take the run folder's lock {self.lock_file}", param="out")

    # -- keeping the folder clean -------------------------------------------------------------
    def remove_temporaries(self) -> list[str]:
        """Delete what interrupted atomic writes left behind (`.<name>.<random>.tmp`); their names."""
        if not self.root.is_dir():
            return []
        gone = []
        for p in self.root.iterdir():
            if _TEMPORARY.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p.name)
        return sorted(gone)

    def truncate_metrics(self, step: int) -> int:
        """Keep the metrics of steps up to `step` (a resumed checkpoint's); returns how many lines were dropped."""
        if not self.metrics_file.exists():
            return 0
        keep, dropped = [], 0
        for line in self.metrics_file.read_text().splitlines():
            try:
                record_step = json.loads(line).get("step", 0)
            except (ValueError, AttributeError):
                record_step = None  # a line cut by the kill
            if isinstance(record_step, int) and record_step <= step:
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            write_text(self.metrics_file, "".join(f"{line}\n" for line in keep))
        return dropped

    def discard(self) -> None:
        """Remove a run that failed before its first complete checkpoint: every file of this layout, then the folder if empty."""
        if not self.root.is_dir() or self.checkpoints():
            return
        for p in self.root.iterdir():
            ours = p in (self.recipe_file, self.run_file, self.metrics_file, self.report_file, self.student_file, self.root / "config.json")
            if (ours or _CHECKPOINT.match(p.name) or _TEMPORARY.match(p.name) or p.name in SIDE_FILES) and p.is_file():
                p.unlink(missing_ok=True)
            elif p.name == "1_Pooling" and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    # -- the rest ----------------------------------------------------------------------------
    def create(self, recipe: Recipe, run_info: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(self.recipe_file, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        write_json(self.run_file, run_info)

    def run_info(self) -> dict[str, Any]:
        return json.loads(self.run_file.read_text())

    def update_info(self, extra: dict[str, Any]) -> None:
        """Add keys to `run.json` (written atomically)."""
        write_json(self.run_file, {**self.run_info(), **extra})

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of `metrics.jsonl` (a line cut by a kill is left out)."""
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out


def _alive(holder: dict[str, Any]) -> bool:
    """Whether a lock's process still runs (assumed so for another host: it cannot be checked from here)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
