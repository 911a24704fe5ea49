"""`lowrank bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands._json import print_json
from lowrank_cli.cli.render import bench_tables, console, err_console, generation_tables
from lowrank_cli.errors import LowrankError
from lowrank_cli.measure.timing import RUNTIMES
from lowrank_cli.pipelines.bench import DEFAULT_PROMPT_LEN, GenerationSettings, bench_checkpoint, bench_generation

app = typer.Typer(add_completion=False)


@app.command()
def bench(
    model: Optional[Path] = typer.Argument(None, help="A factorized checkpoint or a run directory (default: the newest run under ./runs/)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Dense checkpoint to compare with (default: the model merged dense)."),
    batch: int = typer.Option(8, "--batch", "-b", min=1, help="Examples per forward pass (texts of --seq-len tokens, or images); "
                                                                "with --generate, the second batch size after 1."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: the runtime's)."),
    runtime: Literal[RUNTIMES] = typer.Option("torch", "--runtime", help="Where the models run: PyTorch, or onnxruntime on their "
                                                                        "ONNX exports."),
    device: str = opt.DeviceOpt,
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="Timed runs of each model, interleaved (default 10; 3 with --generate)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, help="Untimed runs of each model first (default 2; 1 with --generate)."),
    layers: bool = typer.Option(False, "--layers", help="Also time each factorized linear against its dense shape."),
    seq_len: Optional[int] = opt.SeqLenOpt,
    generate: Optional[int] = typer.Option(None, "--generate", min=2, help="Causal LMs: time greedy generation of this many new tokens "
                                           "with the KV cache (prefill, first token, decode, memory) at batch 1 and --batch."),
    prompt_len: Optional[int] = typer.Option(None, "--prompt-len", min=1, help=f"With --generate: prompt tokens per sequence (default {DEFAULT_PROMPT_LEN})."),
    compile_model: bool = typer.Option(False, "--compile", help="With --generate: torch.compile both models first (minutes on a CPU)."),
    memory: Optional[bool] = typer.Option(None, "--memory/--no-memory", help="With --generate: also measure the memory loading and generating add (default: yes)."),
    as_json: bool = opt.JsonOpt,
) -> None:
    """Latency of a factorized model vs its dense baseline: measured speedup, ideal (MAC ratio), efficiency; with --generate,
    tokens per second of generation with a KV cache against the ideal of weight bytes read per token."""
    if threads is not None and device.startswith("cuda"):
        err_console.print("[yellow]note:[/] --threads sets CPU threads; it has no effect on the CUDA timings")
    if generate is not None:
        if layers or seq_len is not None:
            raise LowrankError("--layers and --seq-len time one forward pass; with --generate give --prompt-len instead", param="generate")
        settings = GenerationSettings(generate, batch, prompt_len or DEFAULT_PROMPT_LEN, threads, runtime, device, compile_model,
                                      warmup=1 if warmup is None else warmup, repeats=repeats or 3, memory=memory is not False)
        gen = bench_generation(model, baseline, settings)
        if as_json:
            print_json(gen.to_dict())
        else:
            for table in generation_tables(gen):
                console.print(table)
        return
    if compile_model or prompt_len is not None or memory is not None:
        raise LowrankError("--compile, --prompt-len and --memory/--no-memory apply with --generate N", param="generate")
    result = bench_checkpoint(model, baseline, batch=batch, threads=threads, runtime=runtime, device=device,
                              layers=layers, warmup=2 if warmup is None else warmup, repeats=repeats or 10, seq_len=seq_len)
    if as_json:
        print_json(result.to_dict())
    else:
        for table in bench_tables(result):
            console.print(table)
