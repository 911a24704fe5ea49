"""`--set KEY=VALUE`: any recipe key from the command line, checked like the file (`recipe.apply_overrides`), recorded by the run;
`--epochs` trains the epochs asked (the recipe's `distill.max_steps` cap dropped unless `--set` gives one)."""

import json

import pytest
import yaml
from conftest import TINY_VIT, TINY_VIT_KWARGS, manifest_of, model_args, one_line_error, tiny_recipe

from lowrank_cli.cli.options import budget_note, recipe_overrides
from lowrank_cli.errors import LowrankError
from lowrank_cli.recipe import apply_overrides, load_recipe, resolve_recipe_path

TINY = ("--model", TINY_VIT, *model_args(TINY_VIT_KWARGS))
DISTILL_KEYS = "accepted under distill: lr, alpha"  # the closest key first, then the level's keys in the schema's order


def test_values_are_read_as_yaml():
    r = load_recipe("bert", ["distill.lr=1e-4", "factorize.kappa=3", "distill.dropout=true", "distill.max_steps=null",
                             "select.exclude=[pooler, fc2]", "name=2024", "model_kwargs.img_size=64", "distill.seed=1", "distill.seed=7"])
    assert r.distill.lr == 1e-4 and isinstance(r.distill.lr, float)  # 1e-4: a number, though YAML 1.1 reads it as a string
    assert (r.factorize.kappa, r.distill.dropout, r.distill.max_steps, r.select.exclude) == (3.0, True, None, ["pooler", "fc2"])
    assert (r.name, r.model_kwargs, r.distill.seed) == ("2024", {"img_size": 64}, 7)  # a key of strings keeps the text; the last one wins
    assert load_recipe("bert").distill.max_steps == 3200  # the file is not changed


def test_a_key_below_a_section_that_is_off_turns_it_on():
    assert load_recipe("vit").distill.local is None
    local = load_recipe("vit", ["distill.local.steps=5"]).distill.local
    assert (local.steps, local.rounds) == (5, 1)  # the rest at their defaults
    assert load_recipe("bert", ["distill.local=null"]).distill.local is None
    assert load_recipe("vit", ["factorize.embeddings.rank=8"]).factorize.embeddings.rank == 8
    assert load_recipe(None, ["factorize.kappa=4"]).factorize.kappa == 4  # no recipe: the defaults, overridden
    # a recipe already loaded (e.g. a manifest's): every key present, None included
    assert load_recipe("deit").with_overrides(["distill.epochs=3", "distill.local.lr=0.01"]).distill.local.lr == 0.01


def test_apply_overrides_leaves_its_input_alone():
    data = {"distill": {"lr": 1.0}}
    assert apply_overrides(data, ["distill.lr=2", "distill.local.steps=3"]) == {"distill": {"lr": 2, "local": {"steps": 3}}}
    assert data == {"distill": {"lr": 1.0}}


@pytest.mark.parametrize("item,needles", [
    ("lr=1e-4", ["override 'lr=1e-4': unknown recipe key 'lr'; accepted at the top level: name, description, model,"]),
    ("distil.lr=1", ["unknown recipe key 'distil' (did you mean 'distill'?); accepted at the top level: distill, name,"]),
    ("distill.lrr=1e-4", ["unknown recipe key 'distill.lrr' (did you mean 'lr'?);", DISTILL_KEYS, "strategy"]),
    ("distill.local.stepz=3", ["unknown recipe key 'distill.local.stepz' (did you mean 'steps'?); accepted under distill.local: steps,"]),
    ("distill.lr", ["override 'distill.lr': expected KEY=VALUE with a dotted recipe key, e.g. distill.lr=1e-4"]),
    ("=3", ["override '=3': expected KEY=VALUE"]),
    ("distill..lr=3", ["override 'distill..lr=3': expected KEY=VALUE"]),
    ("distill.lr=[1", ["override 'distill.lr=[1': '[1' is not a YAML value"]),
    ("factorize.kappa.x=1", ["'factorize.kappa' is a single value, not a section of keys"]),
    ("select.exclude.0=head", ["'select.exclude' is a list: set it whole, e.g. select.exclude=[...]"]),
])
def test_bad_keys_name_the_key_and_what_is_accepted(item, needles):
    with pytest.raises(LowrankError) as e:
        load_recipe("bert", [item])
    assert e.value.param == "overrides" and "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


@pytest.mark.parametrize("item,needles", [
    ("distill.lr=fast", ["with distill.lr=fast: distill.lr: Input should be a valid number", "(got 'fast')"]),
    ("distill.epochs=1.5", ["distill.epochs: Input should be a valid integer", "(got 1.5)"]),
    ("distill.strategy=dp", ["distill.strategy: Input should be 'ddp' or 'fsdp' (got 'dp')"]),
    ("factorize.kappa=0.5", ["factorize.kappa: Input should be greater than 1 (got 0.5)"]),
    ("distill.budget=90", ["distill.budget: not a duration such as 30m", "(got '90')"]),
    ("distill=3", ["distill: Input should be a valid dictionary"]),
])
def test_wrong_values_name_key_value_and_type(item, needles):
    with pytest.raises(LowrankError) as e:
        load_recipe("bert", [item])
    assert str(e.value).startswith(f"{resolve_recipe_path('bert')} with {item}: ")
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


@pytest.mark.parametrize("args,needles,code", [
    (["--set", "distill.lrr=1"], ["error: override 'distill.lrr=1': unknown recipe key 'distill.lrr'", DISTILL_KEYS, "(option --set)"], 1),
    (["--set", "distil.lr=1"], ["unknown recipe key 'distil' (did you mean 'distill'?)"], 1),
    (["--set", "distill.local.stepz=1"], ["unknown recipe key 'distill.local.stepz'"], 1),
    (["--set", "distill.lr"], ["expected KEY=VALUE"], 1),
    (["--set", "distill.lr=fast"], ["tiny.yaml with distill.lr=fast: distill.lr: Input should be a valid number", "(got 'fast')"], 1),
    (["--kappa", "3", "--set", "factorize.kappa=2"], ["--kappa and --set factorize.kappa=... both set factorize.kappa; give it once"], 1),
    (["--epochs", "2", "--set", "distill.epochs=3"], ["--epochs and --set distill.epochs=..."], 1),
    (["--data", "digits", "--set", "data.source=synthetic"], ["--data and --set data.source=..."], 1),
    (["--strategy", "ddp", "--set", "distill.strategy=ddp"], ["--strategy and --set distill.strategy=..."], 1),
])
def test_compress_refuses_bad_sets_in_one_line_and_writes_nothing(cli, tmp_path, vit_ckpt, args, needles, code):
    out = tmp_path / "run"
    one_line_error(cli("compress", vit_ckpt, "--recipe", tiny_recipe(tmp_path), "--out", out, "--device", "cpu", *args), *needles, code=code)
    assert not out.exists()


@pytest.mark.parametrize("command", ["inspect", "factorize"])
def test_every_recipe_command_checks_its_sets(cli, tmp_path, vit_ckpt, command):
    one_line_error(cli(command, vit_ckpt, *TINY, "--set", "factorize.kapa=3"), "(did you mean 'kappa'?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.safetensors"]


def test_factorize_set_reaches_the_ranks_and_the_manifest(cli, tmp_path, vit_ckpt):
    by_flag, by_set = tmp_path / "flag.safetensors", tmp_path / "set.safetensors"
    assert cli("factorize", vit_ckpt, *TINY, "--kappa", "3", "--out", by_flag).code == 0
    r = cli("factorize", vit_ckpt, *TINY, "--set", "factorize.kappa=3", "--set", "select.exclude=[norm, head, patch_embed, fc2]",
            "--out", by_set, "--json")
    assert r.code == 0, r.err
    flag, sets = manifest_of(by_flag), manifest_of(by_set)
    assert sets["layers"]["blocks.0.attn.qkv"]["rank"] == flag["layers"]["blocks.0.attn.qkv"]["rank"] == 16  # κ = 3: 64·192 / (3·256)
    assert "blocks.0.mlp.fc2" in flag["layers"] and not any(name.endswith("fc2") for name in sets["layers"])
    assert sets["recipe"]["factorize"]["kappa"] == 3.0 and sets["recipe"]["select"]["exclude"] == ["norm", "head", "patch_embed", "fc2"]


def test_epochs_lift_the_recipes_step_cap_and_the_run_records_the_sets(cli, tmp_path, vit_ckpt):
    recipe = tiny_recipe(tmp_path, max_steps=2, epochs=1, checkpoint_every=0)  # 4 steps an epoch (64 examples, batch 16)
    out = tmp_path / "run"
    r = cli("compress", vit_ckpt, "--recipe", recipe, "--out", out, "--device", "cpu", "--epochs", "2", "--set", "distill.lr=2e-3", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["train"]["steps"] == 8  # both epochs, not the recipe's 2 steps
    saved = yaml.safe_load((out / "recipe.yaml").read_text())["distill"]
    assert (saved["epochs"], saved["max_steps"], saved["lr"]) == (2, None, 2e-3)
    assert manifest_of(out / "student.safetensors")["recipe"]["distill"]["lr"] == 2e-3

    # a factorized checkpoint distilled without --recipe: its manifest's recipe, with the sets; a cap given with --epochs holds
    out2 = tmp_path / "again"
    r = cli("distill", out / "student.safetensors", "--teacher", vit_ckpt, "--out", out2, "--device", "cpu", "--epochs", "2",
            "--set", "distill.max_steps=3", "--set", "distill.lr=5e-4", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["train"]["steps"] == 3
    saved = yaml.safe_load((out2 / "recipe.yaml").read_text())
    assert (saved["name"], saved["distill"]["epochs"], saved["distill"]["max_steps"], saved["distill"]["lr"]) == ("tiny", 2, 3, 5e-4)


def test_epochs_as_overrides_and_the_budget_note():
    assert recipe_overrides(None) == [] and recipe_overrides(["a.b=1"], kappa=None) == ["a.b=1"]
    assert recipe_overrides(["distill.lr=1"], 3) == ["distill.epochs=3", "distill.max_steps=null", "distill.lr=1"]
    assert recipe_overrides(["distill.max_steps=9"], 3) == ["distill.epochs=3", "distill.max_steps=9"]
    with pytest.raises(LowrankError, match=r"--latency-aware and --set select.latency_aware=\.\.\. both set"):
        recipe_overrides(["select.latency_aware=false"], latency_aware=True)
    assert recipe_overrides(["select.latency_aware=false"], latency_aware=False) == ["select.latency_aware=false"]  # a flag not given
    r = load_recipe("bert", recipe_overrides([], 2))
    assert (r.distill.epochs, r.distill.max_steps, r.distill.budget) == (2, None, "20m")
    assert budget_note(r.distill.budget, 2) == ("--epochs 2: at most 2 epochs within the time budget distill.budget 20m "
                                                "(--budget to change it, --set distill.budget=null to train all of them)")
    assert budget_note(None, 2) is None and budget_note("20m", None) is None
