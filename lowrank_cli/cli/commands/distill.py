"""`lowrank distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands.compress import print_report
from lowrank_cli.cli import launch
from lowrank_cli.cli.app import command_started
from lowrank_cli.cli.render import err_console
from lowrank_cli.cli.render_training import training_progress
from lowrank_cli.pipelines.compress import check_world_steps, distill_checkpoint, prepare_distill
from lowrank_cli.recipe import load_recipe

app = typer.Typer(add_completion=False)


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
    strategy: Optional[str] = opt.StrategyOpt,
    budget: Optional[str] = opt.BudgetOpt,
    as_json: bool = opt.JsonOpt,
) -> None:
    """Distill an already factorized checkpoint against its dense original (PELA pre-training)."""
    launch.check(nproc, device, nnodes, node_rank, rdzv_endpoint, resume)  # before anything is read, written or started
    r = load_recipe(recipe) if recipe else None
    if launch.launches(nproc, nnodes):
        prepared = prepare_distill(factorized, teacher, r, out=out, resume=resume, device=device, data=data, epochs=epochs,
                                   strategy=strategy, budget=budget)  # checks only
        check_world_steps(prepared, (nproc or 1) * nnodes)
        run = prepared.run
        del prepared  # no model held while torchrun runs
        with launch.lock_for_launch(run, node_rank):  # held for the processes torchrun starts
            if launch.relaunch(nproc, nnodes, node_rank, rdzv_endpoint):
                return
    with training_progress("distill", enabled=launch.is_main_process()) as log:
        report = distill_checkpoint(factorized, teacher, r, out=out, resume=resume, device=device, data=data, epochs=epochs,
                                    strategy=strategy, budget=budget, started=command_started(), log=log, note=lambda s: err_console.print(f"[dim]{s}[/]"))
    print_report(report, as_json)
