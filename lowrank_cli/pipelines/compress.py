"""`compress` (factorize, then distill) and `distill` (a checkpoint already factorized).

Both go through the same steps:

1. Check every input before anything is written: data, teacher, run folder, device.
2. Evaluate the teacher and the SVD-only student.
3. Train the student against the frozen teacher (`distill.train`: PELA or PC-LoRA).
4. Save the final student in the format `lowrank factorize` writes, with a `distill` record
   in its manifest; evaluate it; write `report.json`.

Under torchrun, every process trains; rank 0 alone evaluates, writes and reports (under FSDP every process runs the
periodic evaluations, rank 0 records them).

The steps live in the pipelines' shared home, beside `demo`'s use of them: `common.prepare`
(step 1), `common.run_loop` (steps 2–4) and `common.report`; this module puts them together.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lowrank_cli.device import resolve_device
from lowrank_cli.distill.distributed import barrier, close_distributed, init_distributed
from lowrank_cli.io.rundir import RunDir
from lowrank_cli.pipelines.common.prepare import (PreparedRun, check_compress, check_world_steps, claimed, prepare_compress, prepare_distill,
                                                  with_run_options)
from lowrank_cli.pipelines.common.report import recovered_fraction
from lowrank_cli.pipelines.common.run_loop import Log, run_distillation, weights_digest
from lowrank_cli.pipelines.common.streamed import compress_streamed, discard_streamed, one_process_only, streamed_compress
from lowrank_cli.recipe import Recipe

__all__ = ["PreparedRun", "check_compress", "check_world_steps", "claimed", "compress_checkpoint", "distill_checkpoint", "prepare_compress", "prepare_distill", "recovered_fraction",
           "run_distillation", "weights_digest", "with_run_options"]


def compress_checkpoint(checkpoint, recipe: Recipe, *, device: str = "auto", log: Log | None = None, note=None, step_hook=None, **kw) -> dict[str, Any]:
    """Factorize `checkpoint` by the recipe and distill it; the library form of `lowrank compress`."""
    env = init_distributed(resolve_device(device))
    try:
        # a model whose in-memory run exceeds factorize.max_memory: one block at a time, in one process
        streamed = None  # several processes by the machine's memory alone: the in-memory path, as before
        if not env.distributed or recipe.factorize.max_memory is not None:
            streamed = streamed_compress(checkpoint or recipe.checkpoint, recipe, kw.get("arch"), kw.get("model_kwargs"))
        if streamed is not None:
            if env.distributed:
                raise one_process_only(streamed, env.world)
            return _compress_streamed(streamed, checkpoint or recipe.checkpoint, recipe, device=device, log=log, note=note, **kw)
        p = prepare_compress(checkpoint, recipe, device=device, env=env, note=note if env.is_main else None, **kw)
        barrier(env)  # every process has checked the run folder before rank 0 writes in it (else a slow one finds "already holds a run")
        with claimed(p):
            return run_distillation(p, log=log, note=note, step_hook=step_hook)
    finally:
        close_distributed()


def _compress_streamed(streamed, checkpoint, recipe: Recipe, *, device: str, log: Log | None, note, out=None, resume: bool = False,
                       started: float | None = None, **_kw) -> dict[str, Any]:
    """`compress_streamed` into a new run folder (or a streamed run's, to resume it), held under its lock; a failure before
    the first finished block removes what it wrote."""
    run = RunDir(out or Path("runs") / recipe.name)
    run.check_free()
    with run.locked():
        if not resume:
            shutil.rmtree(run.root / ".activations", ignore_errors=True)  # left by a killed run before it created anything
            run.check_new()
        try:
            return compress_streamed(streamed, checkpoint, recipe, run, device=device, note=note, log=log, started=started, resume=resume)
        except BaseException:
            if not resume:  # a resumed run keeps what it had
                discard_streamed(run)
            raise


def distill_checkpoint(factorized, teacher, recipe: Recipe | None = None, *, device: str = "auto", log: Log | None = None, note=None, step_hook=None, **kw) -> dict[str, Any]:
    """Distill an already factorized checkpoint against its original; the library form of `lowrank distill`."""
    env = init_distributed(resolve_device(device))
    try:
        p = prepare_distill(factorized, teacher, recipe, device=device, env=env, note=note if env.is_main else None, **kw)
        barrier(env)  # every process has checked the run folder before rank 0 writes in it
        with claimed(p):
            return run_distillation(p, log=log, note=note, step_hook=step_hook)
    finally:
        close_distributed()
