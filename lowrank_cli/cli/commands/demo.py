"""`lowrank demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands._json import print_json
from lowrank_cli.cli.render import console, err_console
from lowrank_cli.cli.render_training import compress_table, demo_seeds_table, training_progress
from lowrank_cli.errors import LowrankError
from lowrank_cli.pipelines.demo import DEMO_RECIPES, run_demo

app = typer.Typer(add_completion=False)


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/demo, runs/demo-pclora; a previous demo run there is replaced)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Distillation epochs of each seed (default: the demo recipe's 10)."),
    seeds: int = typer.Option(5, "--seeds", min=1, help="Run seeds 0 … N−1 (teacher and distillation) and report the median and range."),
    method: Literal[tuple(DEMO_RECIPES)] = typer.Option("pela", "--method", help="pela: SVD then PELA distillation; pclora: PC-LoRA "
                                                        "progressive compression to the same ranks."),
    device: str = opt.DeviceOpt,
    retrain: bool = typer.Option(False, "--retrain-teacher", help="Train the teacher again even if one is cached."),
    as_json: bool = opt.JsonOpt,
) -> None:
    """Train a small ViT on handwritten digits, factorize it at κ=3, distill it, and report the accuracy recovered."""
    if method not in DEMO_RECIPES:
        raise LowrankError(f"--method '{method}': accepted: {', '.join(DEMO_RECIPES)}")
    out = out or Path("runs") / DEMO_RECIPES[method]
    note = lambda s: err_console.print(f"[dim]{s}[/]")  # noqa: E731
    with training_progress("teacher") as teacher_log, training_progress("distill") as log:
        report = run_demo(out, device=device, epochs=epochs, retrain=retrain, seeds=seeds, teacher_log=teacher_log, log=log, note=note, method=method)
    if as_json:
        print_json(report)
        return
    how = "SVD then PELA distillation" if method == "pela" else "PC-LoRA progressive compression"
    console.print(compress_table(report, title=f"lowrank demo, seed 0: κ = {report['kappa']:g}, {how}"))
    console.print(demo_seeds_table(report, "distillation" if method == "pela" else "PC-LoRA"))
