"""`lowrank export`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands._json import print_json
from lowrank_cli.cli.render import console, export_table
from lowrank_cli.errors import LowrankError
from lowrank_cli.export.cast import DTYPES
from lowrank_cli.pipelines.export import FORMATS, export_checkpoint, export_hf_checkpoint

app = typer.Typer(add_completion=False)


@app.command()
def export(
    model: Optional[Path] = typer.Argument(None, help="A factorized checkpoint or a run directory (default: the newest run under ./runs/)."),
    fmt: Literal[FORMATS] = typer.Option("onnx", "--format", "-f",
                                         help="onnx (a verified graph), dense (the factors merged back), safetensors (the factorized "
                                              "checkpoint cast to --dtype) or hf (a Hub folder stock transformers loads with "
                                              "trust_remote_code, the factors kept)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file, or folder of a Hub export (default: beside the input)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", min=1, help="Image models: the ONNX input's image size "
                                                                           "(default: the model's)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset version (default 18)."),
    dtype: Optional[Literal[tuple(DTYPES)]] = typer.Option(None, "--dtype", help="The weights' dtype (dense, safetensors and hf)."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size",
                                                  help="Dense export of a transformers model: weight shards of at most this size (bytes, 500MB, 2GB)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="--format hf: the Hub id of the model it was compressed from, "
                                                                        "for the model card's base_model."),
    kv_cache: Optional[bool] = typer.Option(None, "--kv-cache/--no-kv-cache",
                                            help="ONNX of a causal LM: the graph with a KV cache, in a folder optimum's ORTModelForCausalLM "
                                                 "loads (default for causal LMs), or one .onnx file without a cache."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists (never the input)."),
    as_json: bool = opt.JsonOpt,
) -> None:
    """Deployable artifacts: verified ONNX, dense weights, a dtype-cast factorized checkpoint, or a Hub folder that
    transformers loads without lowrank."""
    shard = int(max_shard_size) if max_shard_size is not None and max_shard_size.isdigit() else max_shard_size
    if base_model is not None and fmt != "hf":
        raise LowrankError(f"base_model applies to the hf format only, not {fmt}", param="base_model")
    if base_model is not None and (img_size, opset, shard, kv_cache) == (None, None, None, None):  # else export_checkpoint refuses those for hf
        result = export_hf_checkpoint(model, out, dtype=dtype, force=force, base_model=base_model)
    else:
        result = export_checkpoint(model, fmt, out, img_size=img_size, opset=opset, dtype=dtype, force=force, max_shard_size=shard,
                                   kv_cache=kv_cache)
    if as_json:
        print_json(result.to_dict())
    else:
        console.print(export_table(result))
