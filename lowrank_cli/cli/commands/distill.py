"""`lowrank distill`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands.compress import print_report
from lowrank_cli.cli import launch
from lowrank_cli.cli.app import command_started
from lowrank_cli.cli.render import err_console
from lowrank_cli.cli.render_training import training_progress
from lowrank_cli.pipelines.common import require_manifest
from lowrank_cli.pipelines.compress import check_world_steps, distill_checkpoint, prepare_distill
from lowrank_cli.recipe import Recipe, load_recipe, recipe_from_dict

app = typer.Typer(add_completion=False)


def _manifest_recipe(factorized: Path) -> Recipe:
    """The recipe a factorized checkpoint records (what `distill` uses without --recipe), for `--set` and `--epochs` to change."""
    _header, manifest = require_manifest(factorized, "distillation", need_architecture=True)
    return recipe_from_dict(manifest.recipe or {}, source=f"{factorized} (its manifest's recipe)")


@app.command()
def distill(
    factorized: Path = typer.Argument(..., help="A checkpoint written by `lowrank factorize`."),
    teacher: Path = typer.Option(..., "--teacher", "-t", help="The original dense checkpoint it was factorized from."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe for the distill:/data: settings (default: the one in the checkpoint's manifest)."),
    data: Optional[str] = opt.DataOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>)."),
    epochs: Optional[int] = opt.EpochsOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: str = opt.DeviceOpt,
    nproc: Optional[int] = opt.NprocOpt,
    nnodes: int = opt.NnodesOpt,
    node_rank: int = opt.NodeRankOpt,
    rdzv_endpoint: Optional[str] = opt.RdzvEndpointOpt,
    strategy: Optional[opt.Strategy] = opt.StrategyOpt,
    budget: Optional[str] = opt.BudgetOpt,
    sets: Optional[List[str]] = opt.SetOpt,
    as_json: bool = opt.JsonOpt,
) -> None:
    """Distill an already factorized checkpoint against its dense original (PELA pre-training)."""
    launch.check(nproc, device, nnodes, node_rank, rdzv_endpoint, resume)  # before anything is read, written or started
    overrides = opt.recipe_overrides(sets, epochs, data=data, strategy=strategy, budget=budget)
    r = load_recipe(recipe, overrides) if recipe else _manifest_recipe(factorized).with_overrides(overrides) if overrides else None
    if r is not None and (note := opt.budget_note(budget or r.distill.budget, epochs)) and launch.is_main_process():
        err_console.print(f"[dim]note: {note}[/]")
    if launch.launches(nproc, nnodes):
        prepared = prepare_distill(factorized, teacher, r, out=out, resume=resume, device=device, data=data,
                                   strategy=strategy, budget=budget)  # checks only
        check_world_steps(prepared, (nproc or 1) * nnodes)
        run = prepared.run
        del prepared  # no model held while torchrun runs
        with launch.lock_for_launch(run, node_rank):  # held for the processes torchrun starts
            if launch.relaunch(nproc, nnodes, node_rank, rdzv_endpoint):
                return
    with training_progress("distill", enabled=launch.is_main_process()) as log:
        report = distill_checkpoint(factorized, teacher, r, out=out, resume=resume, device=device, data=data,
                                    strategy=strategy, budget=budget, started=command_started(), log=log, note=lambda s: err_console.print(f"[dim]{s}[/]"))
    print_report(report, as_json)
