"""`lowrank recipes`: every bundled recipe in one table (or JSON), and one recipe's every setting with `--set` applied."""

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import one_line_error

from lowrank_cli.recipe import bundled_recipes_dir, load_recipe

REPO_RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_every_bundled_file_is_listed(cli):
    assert len(REPO_RECIPES) >= 9 and REPO_RECIPES == sorted(p.stem for p in bundled_recipes_dir().glob("*.yaml"))
    r = cli("recipes", "--json")
    assert r.code == 0, r.err
    rows = {row["name"]: row for row in json.loads(r.out)["recipes"]}
    assert sorted(rows) == REPO_RECIPES
    for name, row in rows.items():
        recipe = load_recipe(name)
        assert row["description"] == recipe.description and row["description"].strip() and "\n" not in row["description"]
        assert row["rule"] == recipe.factorize.rule_label() and Path(row["file"]).stem == name
    bert = rows["bert"]
    assert (bert["kappa"], bert["rule"], bert["factors"], bert["budget"], bert["max_steps"]) == (2.0, "kappa=2 (sensitivity)", "whitened", "20m", 3200)
    assert bert["selects"].startswith("every linear but pooler, classifier")
    assert rows["pclora-vit"]["rule"] == "rank=32" and rows["pclora-vit"]["kappa"] is None
    assert rows["swin"]["selects"].endswith("attn.proj") and rows["swin"]["training"] == "50 epochs"

    table = cli("recipes")
    assert table.code == 0 and table.err == ""
    for name in REPO_RECIPES:
        assert f"│ {name} " in table.out, name
    assert "20m budget (40 epochs, at most 3200 steps)" in table.out and "kappa=1.5" in table.out


def test_one_recipe_every_setting_with_sets(cli):
    r = cli("recipes", "bert", "--set", "distill.lr=2e-4", "--set", "distill.local=null")
    assert r.code == 0, r.err
    header, body = r.out.split("\n", 1)
    assert header.endswith("bert.yaml with distill.lr=2e-4 distill.local=null")
    shown = yaml.safe_load(body)
    assert shown == load_recipe("bert", ["distill.lr=2e-4", "distill.local=null"]).to_dict()
    assert shown["distill"]["lr"] == 2e-4 and shown["distill"]["local"] is None and shown["data"]["val_documents"] == 1000  # defaults shown
    as_json = cli("recipes", "deit", "--json")
    assert as_json.code == 0 and json.loads(as_json.out) == load_recipe("deit").to_dict()


def test_recipes_bad_input(cli, tmp_path):
    one_line_error(cli("recipes", "bert", "--set", "distill.lrr=1"), "unknown recipe key 'distill.lrr' (did you mean 'lr'?)", "(option --set)")
    one_line_error(cli("recipes", "bret"), "recipe 'bret': no such file or bundled recipe (did you mean 'bert'?); bundled: bert, causal-lm")
    one_line_error(cli("recipes", "--set", "distill.lr=1"), "'--set'", "applies to one recipe: give its NAME", code=2)
    mine = tmp_path / "mine.yaml"
    mine.write_text("factorize:\n  kappa: 3\n")
    r = cli("recipes", mine, "--json")
    assert r.code == 0 and json.loads(r.out)["name"] == "mine" and json.loads(r.out)["factorize"]["kappa"] == 3


def test_listed_in_the_help_and_imports_no_torch(cli):
    r = cli("--help")
    assert r.code == 0 and "recipes" in r.out
    code = ("import sys\nfrom lowrank_cli.cli.app import main\ntry:\n    main(['recipes', '--json'])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
