"""`lowrank inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands._json import print_json
from lowrank_cli.cli.render import err_console, print_inspection
from lowrank_cli.errors import LowrankError
from lowrank_cli.pipelines.inspect import inspect_checkpoint

app = typer.Typer(add_completion=False)


@app.command()
def inspect(
    checkpoint: Optional[Path] = typer.Argument(None, help="A .safetensors file (any model, factorized or not)."),
    model: Optional[str] = opt.ModelOpt,
    model_arg: opt.ModelArgs = opt.ModelArgOpt,
    recipe: Optional[str] = opt.RecipeOpt,
    kappa: Optional[float] = opt.KappaOpt,
    spectrum: bool = typer.Option(False, "--spectrum", help="Show the singular-value energy kept at each layer's rank."),
    latency_aware: bool = opt.LatencyOpt,
    seq_len: Optional[int] = opt.SeqLenOpt,
    sets: Optional[List[str]] = opt.SetOpt,
    as_json: bool = opt.JsonOpt,
) -> None:
    """What is in a checkpoint, which linear layers can be factorized, and what each saves."""
    r = opt.load_recipe_with(recipe, kappa, latency_aware, opt.recipe_overrides(sets, kappa=kappa, latency_aware=latency_aware))
    if checkpoint is None and model is None and r.model is None:
        raise LowrankError("give a checkpoint, or an architecture with --model (e.g. --model deit_base_patch16_224)")
    insp = inspect_checkpoint(checkpoint, r, model, opt.parse_model_args(model_arg), spectrum=spectrum, seq_len=seq_len)
    given = (("--kappa", kappa is not None), ("--recipe", recipe is not None), ("--latency-aware", latency_aware), ("--set", bool(sets)))
    ignored = [flag for flag, on in given if on]
    if insp.factorized_checkpoint and ignored:
        err_console.print(f"[yellow]note:[/] {checkpoint} is already factorized: {', '.join(ignored)} had no effect; shown are the ranks it was factorized with")
    if as_json:
        print_json(insp.to_dict())
    else:
        print_inspection(insp, spectrum=spectrum)
