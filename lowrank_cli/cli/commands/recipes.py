"""`lowrank recipes`: the bundled recipes in one table, or one recipe's every setting (with `--set` applied).

Imports neither torch nor a model library: a recipe is data (`lowrank_cli.recipe`).
"""

from __future__ import annotations

from typing import Any, List, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.commands._json import print_json
from lowrank_cli.recipe import Recipe, bundled_recipe_names, load_recipe, resolve_recipe_path

app = typer.Typer(add_completion=False)


def selection(recipe: Recipe) -> str:
    """What a recipe factorizes, in words: `every linear but norm, head`, `qkv, fc1 but head`, and the embeddings."""
    s = recipe.select
    text = ", ".join(s.include) if s.include else "every linear"
    if s.exclude:
        text += f" but {', '.join(s.exclude)}"
    if recipe.factorize.embeddings is not None:
        text += f"; embeddings ({', '.join(recipe.factorize.embeddings.include)})"
    return text


def training(recipe: Recipe) -> str:
    """How long a recipe distils: its time budget, else its epochs (and the step cap)."""
    d = recipe.distill
    steps = f", at most {d.max_steps} steps" if d.max_steps is not None else ""
    if d.budget is not None:
        return f"{d.budget} budget ({d.epochs} epochs{steps})"
    return f"{d.epochs} epochs{steps}"


def summary(name: str, recipe: Recipe) -> dict[str, Any]:
    """One recipe's row: what it is for, what it selects, its rank rule, how its factors are made, how long it trains."""
    f = recipe.factorize
    return {
        "name": name, "file": str(resolve_recipe_path(name)), "description": recipe.description, "model": recipe.model,
        "selects": selection(recipe), "rank_rule": f.rank_rule, "rule": f.rule_label(),
        "kappa": f.kappa if f.rank_rule == "kappa" else None, "target_params": f.target_params, "target_macs": f.target_macs,
        "factors": f.method, "allocation": f.allocation, "distill_method": recipe.distill.method,
        "budget": recipe.distill.budget, "epochs": recipe.distill.epochs, "max_steps": recipe.distill.max_steps,
        "training": training(recipe),
    }


def recipes_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Bundled recipes (--recipe NAME; `lowrank recipes NAME` shows every setting)")
    for col in ("recipe", "description", "selects", "ranks", "factors", "training"):
        table.add_column(col, overflow="fold")
    for r in rows:
        factors = r["factors"] + (" (PC-LoRA adapters)" if r["distill_method"] == "pclora" else "")
        table.add_row(r["name"], r["description"], r["selects"], r["rule"], factors, r["training"])
    return table


@app.command()
def recipes(
    name: Optional[str] = typer.Argument(None, help="A recipe (a bundled name or a YAML path): print every setting it resolves to, "
                                                    "defaults included, as YAML (the keys --set can change)."),
    sets: Optional[List[str]] = opt.SetOpt,
    as_json: bool = opt.JsonOpt,
) -> None:
    """The bundled recipes: what each is for, what it selects, its ranks (κ or budget) and how long it trains."""
    if name is None:
        if sets:
            raise typer.BadParameter("applies to one recipe: give its NAME", param_hint="'--set'")
        rows = [summary(n, load_recipe(n)) for n in bundled_recipe_names()]
        if as_json:
            print_json({"recipes": rows})
        else:
            Console().print(recipes_table(rows))
        return
    recipe = load_recipe(name, sets or ())
    if as_json:
        print_json(recipe.to_dict())
    else:
        typer.echo(f"# {resolve_recipe_path(name)}{' with ' + ' '.join(sets) if sets else ''}")
        typer.echo(yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True).rstrip())
