"""`lowrank convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowrank_cli.cli.render import console
from lowrank_cli.io.convert import convert_pickle

app = typer.Typer(add_completion=False)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A PyTorch .pth/.pt/.bin state dict."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .safetensors (default: beside the input)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Convert a pickled PyTorch state dict to safetensors, loading it with weights_only=True."""
    written, n = convert_pickle(source, out, force)
    console.print(f"wrote {written} ({n} tensors)")
