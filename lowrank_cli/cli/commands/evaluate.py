"""`lowrank evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands._json import print_json
from lowrank_cli.cli.render import console
from lowrank_cli.cli.render_training import evaluation_table
from lowrank_cli.pipelines.evaluate import evaluate_checkpoint

app = typer.Typer(add_completion=False)


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A dense or factorized .safetensors checkpoint."),
    data: str = typer.Option(..., "--data", "-d", help="Held-out data, by the model's inputs. Text: a .txt/.jsonl file (all of it), "
                            "a folder of them (its val part) or 'pydoc'; images: a folder (its val/ split), 'digits' or 'synthetic'."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Architecture name, for a checkpoint that does not name its own "
                                        "(a factorized checkpoint's manifest and a Hub folder's config.json do)."),
    model_arg: opt.ModelArgs = opt.ModelArgOpt,
    teacher: Optional[Path] = typer.Option(None, "--teacher", "-t", help="The original dense checkpoint: its own figures beside, and feature cosine similarity to it."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Examples per batch (texts or images)."),
    device: str = opt.DeviceOpt,
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable", help="Image data: leave out images that cannot be read (and "
                                                                          "count them) instead of failing."),
    as_json: bool = opt.JsonOpt,
) -> None:
    """Top-1/top-5, embedding cosine or perplexity on the held-out data (and, with --teacher, the teacher's own and feature similarity)."""
    result = evaluate_checkpoint(checkpoint, data, arch=model, model_kwargs=opt.parse_model_args(model_arg), teacher=teacher,
                                 batch_size=batch_size, device=device, skip_unreadable=skip_unreadable)
    if as_json:
        print_json(result)
    else:
        rows = {str(checkpoint): result, **({f"teacher {teacher}": result["teacher"]} if "teacher" in result else {})}
        table = evaluation_table(rows, title=f"Evaluation on {result['data']} (val)")
        if result.get("split"):
            table.caption = f"data: {result['split']}"
        console.print(table)
