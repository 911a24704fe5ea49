import pytest

from lowrank_cli.errors import LowrankError
from lowrank_cli.recipe import bundled_recipe_names, load_recipe


def test_every_shipped_recipe_validates():
    names = bundled_recipe_names()
    assert {"deit", "swin", "vit", "bert", "causal-lm", "hf-vit"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        if name in {"bert", "causal-lm", "hf-vit"}:
            assert recipe.model is None  # a Hugging Face folder's config.json names its architecture
        else:
            assert recipe.model  # every timm recipe names its default architecture


def test_allocation_defaults_to_uniform_and_labels_the_rule():
    from lowrank_cli.recipe import recipe_from_dict
    assert recipe_from_dict({}).factorize.allocation == "uniform"
    measured = {"causal-lm": "sensitivity", "bert": "sensitivity"}  # where sensitivity allocation was measured to win (docs/benchmarks.md)
    for name in bundled_recipe_names():
        assert load_recipe(name).factorize.allocation == measured.get(name, "uniform"), name
    r = recipe_from_dict({"factorize": {"kappa": 4, "allocation": "sensitivity"}})
    assert r.factorize.rule_label() == "kappa=4 (sensitivity)"
    assert r.with_kappa(3).factorize.allocation == "sensitivity"  # --kappa keeps the allocation


def test_shipped_rules():
    deit, swin = load_recipe("deit.yaml"), load_recipe("swin")
    assert (deit.factorize.kappa, swin.factorize.kappa) == (2, 1.5)
    assert "attn.proj" in swin.select.exclude and "attn.proj" not in deit.select.exclude


def test_kappa_override_and_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("factorize:\n  rank_rule: rank\n  rank: 8\n")
    r = load_recipe(str(p))
    assert (r.name, r.factorize.rank_rule, r.factorize.rank) == ("mine", "rank", 8)
    r2 = r.with_kappa(3)
    assert (r2.factorize.rank_rule, r2.factorize.kappa) == ("kappa", 3.0)
    assert r.factorize.rank_rule == "rank"  # the original is untouched
    with pytest.raises(LowrankError, match=r"kappa must be a finite number > 1 \(got 0") as e:
        r.with_kappa(0)
    assert e.value.param == "kappa"  # the library names its argument; the CLI adds its flag
    with pytest.raises(LowrankError, match=r"got inf"):
        r.with_kappa(float("inf"))


@pytest.mark.parametrize("text,message", [
    ("factorise:\n  kappa: 2\n", r"mine.yaml: unknown key 'factorise' \(did you mean 'factorize'\?\); accepted: name, description, model"),
    ("factorize:\n  kapa: 2\n", r"unknown key 'factorize.kapa' \(did you mean 'kappa'\?\)"),
    ("factorize:\n  kappa: two\n", r"factorize.kappa: Input should be a valid number.*\(got 'two'\)"),
    ("factorize:\n  kappa: -1\n", r"factorize.kappa: Input should be greater than 1"),
    ("factorize:\n  rank_rule: energy\n", r"rank_rule 'energy' needs 'energy: F'"),
    ("select:\n  overrides:\n    - pattern: qkv\n", r"give one of kappa, rank, energy, or skip"),
    ("factorize:\n  allocation: sensitive\n", r"factorize.allocation: Input should be 'uniform' or 'sensitivity' \(got 'sensitive'\)"),
    ("factorize:\n  rank_rule: rank\n  rank: 8\n  allocation: sensitivity\n", r"allocation 'sensitivity' .* rank_rule 'kappa' or 'budget' \(rank_rule is 'rank'"),
    ("- a\n- b\n", r"a recipe must be a YAML mapping"),
    ("factorize: [\n", r"not valid YAML at line"),
])
def test_bad_recipes_name_key_and_file(tmp_path, text, message):
    p = tmp_path / "mine.yaml"
    p.write_text(text)
    with pytest.raises(LowrankError, match=message):
        load_recipe(str(p))


def test_unknown_recipe_name_suggests_bundled():
    with pytest.raises(LowrankError, match=r"recipe 'swim': no such file or bundled recipe \(did you mean 'swin'\?\)"):
        load_recipe("swim")
