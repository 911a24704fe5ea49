"""Options shared by several commands, checked where they are parsed, and what the CLI calls each library argument."""

from __future__ import annotations

import math
from typing import Any, List, Optional

import typer
import yaml

from lowrank_cli.errors import LowrankError
from lowrank_cli.recipe import Recipe, load_recipe


def finite_above(name: str, low: float, why: str = ""):
    """A typer callback that accepts a finite number > `low` (or None)."""

    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and not (math.isfinite(value) and value > low):
            raise typer.BadParameter(f"must be a finite number > {low:g} (got {value}){why}", param_hint=f"'{name}'")
        return value

    return check


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """`["depth=2", "img_size=64"]` -> `{"depth": 2, "img_size": 64}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LowrankError(f"--model-arg '{item}': expected KEY=VALUE, e.g. img_size=384 or depths=[2,2,6,2]")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise LowrankError(f"--model-arg '{item}': value '{value}' is not a number, list or string") from None
    return out


ModelOpt = typer.Option(None, "--model", "-m", help="Architecture name (default: the recipe's 'model').")
ModelArgOpt = typer.Option(None, "--model-arg", help="Architecture setting KEY=VALUE, repeatable (e.g. img_size=384).")
RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe: a bundled name (deit, swin, ...) or a YAML path.")
KappaOpt = typer.Option(None, "--kappa", "-k", callback=finite_above("--kappa", 1, "; κ = 2 halves a layer, κ ≤ 1 would keep it at full size"),
                        help="Compression ratio κ: rank r = floor(d_in·d_out / (κ(d_in+d_out))). Overrides the recipe.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else.")
LatencyOpt = typer.Option(False, "--latency-aware", help="Time each planned layer dense vs factorized on this device; keep dense those not faster by select.latency_margin.")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")
DataOpt = typer.Option(None, "--data", "-d", help="Image folder (ROOT/train/<class>/*, ROOT/val/<class>/*), 'digits' or 'synthetic' (default: the recipe's data.source).")
EpochsOpt = typer.Option(None, "--epochs", min=1, help="Training epochs (overrides the recipe's distill.epochs).")
SeqLenOpt = typer.Option(None, "--seq-len", min=1, help="Text models: tokens per example for MACs and timing (default: the family's, 128).")
NprocOpt = typer.Option(None, "--nproc", min=1, help="Processes (GPUs) to train on, on this node: launches torchrun.")
NnodesOpt = typer.Option(1, "--nnodes", min=1, help="Machines (nodes) taking part; run the same command on each, with its --node-rank.")
NodeRankOpt = typer.Option(0, "--node-rank", min=0, help="This machine's place among --nnodes, 0 to N-1; node 0 writes the run.")
RdzvEndpointOpt = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of node 0 and a free port there, the same on every node (needed with --nnodes > 1).")
StrategyOpt = typer.Option(None, "--strategy", help="Several processes: ddp (a whole student on each) or fsdp (student, gradients, "
                           "optimizer state and teacher sharded per block). Overrides the recipe's distill.strategy.")
BudgetOpt = typer.Option(None, "--budget", help="Wall time for the whole command, e.g. 30m, 1h30m or 90s: the step counts of the recipe "
                         "become upper bounds and each stage's count is set from its first steps timed (overrides distill.budget).")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="Memory the command may use, e.g. 1.5GB or 800MB: a model whose in-memory run "
                            "needs more is compressed one transformer block at a time from its files (overrides factorize.max_memory; "
                            "default: the machine's available memory).")
ModelArgs = Optional[List[str]]


def load_recipe_with(recipe: Optional[str], kappa: Optional[float] = None, latency_aware: bool = False) -> Recipe:
    """The recipe named on the command line with `--kappa` and `--latency-aware` applied."""
    return load_recipe(recipe).with_kappa(kappa).with_latency_aware(latency_aware)
