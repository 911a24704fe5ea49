"""`lowrank factorize`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands._json import print_json
from lowrank_cli.cli.render import allocation_table, console, err_console, latency_table, layer_progress, print_notes, summary_table
from lowrank_cli.errors import LowrankError
from lowrank_cli.pipelines.factorize import factorize_checkpoint, with_max_memory

app = typer.Typer(add_completion=False)


@app.command()
def factorize(
    checkpoint: Optional[Path] = typer.Argument(None, help="The .safetensors checkpoint (default: the recipe's 'checkpoint')."),
    recipe: Optional[str] = opt.RecipeOpt,
    model: Optional[str] = opt.ModelOpt,
    model_arg: opt.ModelArgs = opt.ModelArgOpt,
    kappa: Optional[float] = opt.KappaOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: <input>.lowrank.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists (never the input)."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration data for factorize.method whitened/asvd and "
                                             "factorize.allocation sensitivity, by the model's inputs: text a .txt, .jsonl, .csv, "
                                             ".tsv, .parquet or .arrow file, a folder of them, a datasets save_to_disk folder or "
                                             "'pydoc'; images a folder, 'digits' or 'synthetic'."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", min=1, help="Number of calibration examples, texts or images "
                                                "(default: the recipe's factorize.calib_samples)."),
    latency_aware: bool = opt.LatencyOpt,
    seq_len: Optional[int] = opt.SeqLenOpt,
    device: str = typer.Option("auto", "--device", help="Where the SVDs run: auto (CUDA when available), cpu, cuda or cuda:N."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size",
                                                  help="A Hub folder's output: weight shards of at most this size (bytes, 500MB, 2GB; default 5GB)."),
    max_memory: Optional[str] = opt.MaxMemoryOpt,
    sets: Optional[List[str]] = opt.SetOpt,
    as_json: bool = opt.JsonOpt,
) -> None:
    """Replace each selected nn.Linear by two thin linears from its truncated SVD (PELA)."""
    overrides = opt.recipe_overrides(sets, kappa=kappa, latency_aware=latency_aware, max_memory=max_memory, calib_data=calib_data,
                                     calib_samples=calib_samples)
    r = with_max_memory(opt.load_recipe_with(recipe, kappa, latency_aware, overrides), max_memory)
    checkpoint = checkpoint or (Path(r.checkpoint) if r.checkpoint else None)
    if checkpoint is None and model is None and r.model is None:
        raise LowrankError("give a checkpoint (or 'checkpoint:' in the recipe), or an architecture with --model")
    if checkpoint is None:
        err_console.print(f"[yellow]note:[/] no checkpoint given: factorizing {model or r.model} with random weights")
    with layer_progress("SVD") as progress:
        result = factorize_checkpoint(checkpoint, r, out, model, opt.parse_model_args(model_arg), force, progress, calib_data, calib_samples,
                                      seq_len=seq_len, device=device, max_shard_size=max_shard_size)
    if as_json:
        print_json({"out": str(result.out), **result.inspection.to_dict()})
        return
    print_notes(result.inspection.notes)
    if result.inspection.allocation is not None:
        console.print(allocation_table(result.inspection.allocation))
    if result.inspection.latency is not None:
        console.print(latency_table(result.inspection.latency))
    console.print(summary_table(result.inspection, title=f"Factorized → {result.out}"))
    dense = [p for p in result.inspection.layers if not p.factorized and not (p.latency or {}).get("kept_dense")]
    reasons: dict[str, int] = {}
    for p in dense:
        reasons[p.reason] = reasons.get(p.reason, 0) + 1
    for reason, n in reasons.items():
        console.print(f"  [dim]{n} left dense: {reason}[/]")
