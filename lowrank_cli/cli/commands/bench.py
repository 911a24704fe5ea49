"""`lowrank bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands._json import print_json
from lowrank_cli.cli.render import bench_tables, console, err_console
from lowrank_cli.pipelines.bench import bench_checkpoint

app = typer.Typer(add_completion=False)


@app.command()
def bench(
    model: Optional[Path] = typer.Argument(None, help="A factorized checkpoint or a run directory (default: the newest run under ./runs/)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Dense checkpoint to compare with (default: the model merged dense)."),
    batch: int = typer.Option(8, "--batch", "-b", min=1, help="Images per forward pass."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: the runtime's)."),
    runtime: str = typer.Option("torch", "--runtime", help="torch | onnxruntime"),
    device: str = opt.DeviceOpt,
    repeats: int = typer.Option(10, "--repeats", min=1, help="Timed runs of each model, interleaved."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed runs of each model first."),
    layers: bool = typer.Option(False, "--layers", help="Also time each factorized linear against its dense shape."),
    seq_len: Optional[int] = opt.SeqLenOpt,
    as_json: bool = opt.JsonOpt,
) -> None:
    """Latency of a factorized model vs its dense baseline: measured speedup, ideal (MAC ratio), efficiency."""
    if threads is not None and device.startswith("cuda"):
        err_console.print("[yellow]note:[/] --threads sets CPU threads; it has no effect on the CUDA timings")
    result = bench_checkpoint(model, baseline, batch=batch, threads=threads, runtime=runtime, device=device,
                              layers=layers, warmup=warmup, repeats=repeats, seq_len=seq_len)
    if as_json:
        print_json(result.to_dict())
    else:
        for table in bench_tables(result):
            console.print(table)
