"""Options shared by several commands, checked where they are parsed, and what the CLI calls each library argument."""

from __future__ import annotations

import math
from typing import Any, List, Literal, Optional, get_args

import typer
import yaml

from lowrank_cli.errors import LowrankError
from lowrank_cli.recipe import DistillConfig, Recipe, load_recipe


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
RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe: a bundled name (`lowrank recipes` lists them) or a YAML path.")
KappaOpt = typer.Option(None, "--kappa", "-k", callback=finite_above("--kappa", 1, "; κ = 2 halves a layer, κ ≤ 1 would keep it at full size"),
                        help="Compression ratio κ: rank r = floor(d_in·d_out / (κ(d_in+d_out))). Overrides the recipe.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else.")
LatencyOpt = typer.Option(False, "--latency-aware", help="Time each planned layer dense vs factorized on this device; keep dense those not faster by select.latency_margin.")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")
DataOpt = typer.Option(None, "--data", "-d", help="Training data, by the model's inputs. Text: a .txt, .jsonl, .csv, .tsv, .parquet "
                       "or .arrow file, a folder of them (its train/ and val/ parts when it has them), a folder saved by datasets' "
                       "save_to_disk or 'pydoc' (its text field: data.text_field); images: a folder ROOT/train/<class>/*, "
                       "ROOT/val/<class>/*, 'digits' or 'synthetic' (default: the recipe's data.source).")
EpochsOpt = typer.Option(None, "--epochs", min=1, help="Epochs to train, all of them: sets distill.epochs and drops the recipe's "
                         "distill.max_steps cap (keep one with --set distill.max_steps=N). A time budget (distill.budget) still "
                         "bounds them.")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Set a recipe key, dotted, repeatable: --set distill.lr=1e-4 --set "
                      "factorize.kappa=3. The value is read as YAML (3, 1e-4, true, null, \\[a, b]) and checked like the recipe file.")
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


Strategy = Literal[get_args(DistillConfig.model_fields["strategy"].annotation)]  # ddp | fsdp: its choices shown in --help

# the recipe key each option sets: given both ways (`--kappa 3 --set factorize.kappa=2`), it is refused
OPTION_KEYS = {"--kappa": "factorize.kappa", "--data": "data.source", "--epochs": "distill.epochs", "--strategy": "distill.strategy",
               "--budget": "distill.budget", "--max-memory": "factorize.max_memory", "--latency-aware": "select.latency_aware",
               "--calib-data": "factorize.calib_data", "--calib-samples": "factorize.calib_samples"}


def recipe_overrides(sets: Optional[List[str]], epochs: Optional[int] = None, **given: Any) -> list[str]:
    """The recipe overrides of a command line: its `--set KEY=VALUE`s, after `--epochs N` as `distill.epochs=N` and
    `distill.max_steps=null` (the epochs asked are trained: a recipe's step cap, sized for its own epochs, would cut them
    short) unless `--set distill.max_steps=M` gives a cap. `given`: the other options that set a recipe key
    (`kappa=2.0`, `data=None`, ... by their names): one given with `--set` of its key too is refused."""
    sets = list(sets or [])
    keys = {item.partition("=")[0].strip() for item in sets}
    for flag, value in {"--epochs": epochs, **{"--" + k.replace("_", "-"): v for k, v in given.items()}}.items():
        if value not in (None, False) and OPTION_KEYS[flag] in keys:
            raise LowrankError(f"{flag} and --set {OPTION_KEYS[flag]}=... both set {OPTION_KEYS[flag]}; give it once")
    if epochs is None:
        return sets
    return [f"distill.epochs={int(epochs)}", *([] if "distill.max_steps" in keys else ["distill.max_steps=null"]), *sets]


def budget_note(budget: Optional[str], epochs: Optional[int]) -> Optional[str]:
    """A line for `--epochs N` under a time budget (the run's `distill.budget`): it still bounds the epochs (None otherwise)."""
    if epochs is None or budget is None:
        return None
    return (f"--epochs {epochs}: at most {epochs} epochs within the time budget distill.budget {budget} "
            "(--budget to change it, --set distill.budget=null to train all of them)")


def load_recipe_with(recipe: Optional[str], kappa: Optional[float] = None, latency_aware: bool = False,
                     overrides: Optional[List[str]] = None) -> Recipe:
    """The recipe named on the command line with its overrides (`recipe_overrides`), then `--kappa` and `--latency-aware` applied."""
    return load_recipe(recipe, overrides or ()).with_kappa(kappa).with_latency_aware(latency_aware)
