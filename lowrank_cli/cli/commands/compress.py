"""`lowrank compress`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands._json import print_json
from lowrank_cli.cli import launch
from lowrank_cli.cli.app import command_started
from lowrank_cli.cli.render import console, err_console
from lowrank_cli.cli.render_training import budget_table, compress_table, curve_table, training_progress
from lowrank_cli.pipelines.compress import check_compress, compress_checkpoint, with_run_options

app = typer.Typer(add_completion=False)


def print_report(report: dict, as_json: bool) -> None:
    """The run's report (rank 0 only: other processes have none)."""
    if not report:
        return
    if as_json:
        print_json(report)
    else:
        if report.get("architecture_note"):
            console.print(f"[dim]note: {report['architecture_note']}[/]")
        console.print(compress_table(report, title=f"Compressed → {report['student']}"))
        if (curve := curve_table(report)) is not None:
            console.print(curve)
        if (budget := budget_table(report)) is not None:
            console.print(budget)


@app.command()
def compress(
    checkpoint: Optional[Path] = typer.Argument(None, help="The dense .safetensors checkpoint (default: the recipe's 'checkpoint')."),
    recipe: Optional[str] = opt.RecipeOpt,
    model: Optional[str] = opt.ModelOpt,
    model_arg: opt.ModelArgs = opt.ModelArgOpt,
    kappa: Optional[float] = opt.KappaOpt,
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
    max_memory: Optional[str] = opt.MaxMemoryOpt,
    sets: Optional[List[str]] = opt.SetOpt,
    as_json: bool = opt.JsonOpt,
) -> None:
    """Factorize a checkpoint (PELA SVD), then distill it against the original (PELA pre-training)."""
    launch.check(nproc, device, nnodes, node_rank, rdzv_endpoint, resume)  # before anything is read, written or started
    overrides = opt.recipe_overrides(sets, epochs, kappa=kappa, data=data, strategy=strategy, budget=budget, max_memory=max_memory)
    r = with_run_options(opt.load_recipe_with(recipe, kappa, overrides=overrides), data, None, strategy, budget, max_memory)
    if (note := opt.budget_note(r.distill.budget, epochs)) and launch.is_main_process():
        err_console.print(f"[dim]note: {note}[/]")
    kwargs = opt.parse_model_args(model_arg)
    if launch.launches(nproc, nnodes):
        # checks only: no factorization, no model held while torchrun runs
        run = check_compress(checkpoint, r, arch=model, model_kwargs=kwargs, out=out, resume=resume, world=(nproc or 1) * nnodes)
        with launch.lock_for_launch(run, node_rank):  # held for the processes torchrun starts
            if launch.relaunch(nproc, nnodes, node_rank, rdzv_endpoint):
                return
    with training_progress("distill", enabled=launch.is_main_process()) as log:
        report = compress_checkpoint(checkpoint, r, arch=model, model_kwargs=kwargs, out=out, resume=resume, device=device,
                                     started=command_started(), log=log, note=lambda s: err_console.print(f"[dim]{s}[/]"))
    print_report(report, as_json)
