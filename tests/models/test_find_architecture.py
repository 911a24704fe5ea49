"""The architecture comes from the checkpoint: --model, config.json, the manifest, the recipe's model if it fits, or a search."""

import json

import pytest
import timm
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS, one_line_error
from safetensors.torch import save_file

from lowrank_cli.errors import LowrankError
from lowrank_cli.io import read_header
from lowrank_cli.models import ArchitectureHint, NoArchitecture, build_model, get_family


def _checkpoint(tmp_path, arch, **kwargs):
    torch.manual_seed(0)
    path = tmp_path / f"{arch}.safetensors"
    save_file(timm.create_model(arch, pretrained=False, **kwargs).state_dict(), str(path))
    return path


@pytest.mark.slow
def test_a_deit_tiny_checkpoint_with_the_deit_recipe_is_found_not_guessed(cli, tmp_path):
    ckpt = _checkpoint(tmp_path, "deit_tiny_patch16_224", num_classes=10, img_size=112)
    r = cli("inspect", ckpt, "--recipe", "deit", "--json")  # the recipe's model is deit_base_patch16_224
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert (d["architecture"], d["architecture_source"]) == ("deit_tiny_patch16_224", "search")
    assert d["model_kwargs"]["num_classes"] == 10 and d["model_kwargs"]["img_size"] == 112  # from the head and the position embedding
    assert "vit_tiny_patch16_224" in d["notes"][0]  # the same structure: named, not hidden
    assert d["macs_before"] is not None and sum(l["factorized"] for l in d["layers"]) == 48


def test_the_recipes_model_when_the_checkpoint_fits_it_and_the_closest_when_nothing_does(cli, tmp_path, vit_ckpt):
    hint = ArchitectureHint(TINY_VIT, TINY_VIT_KWARGS, ("vit_*",))
    built = build_model(vit_ckpt, hint=hint)
    assert (built.architecture, built.source) == (TINY_VIT, "recipe")
    swin = _checkpoint(tmp_path, "swin_tiny_patch4_window7_224", num_classes=5, embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 2, 2, 2))
    with pytest.raises(NoArchitecture, match="no timm architecture among swin_\\* has its tensors .* tried on the meta device.*closest: swin"):
        build_model(swin, hint=ArchitectureHint(None, {}, ("swin_*",)))
    recipe = tmp_path / "s.yaml"
    recipe.write_text("model: swin_base_patch4_window7_224\narchitectures: [swin_*]\ndata: {source: synthetic}\n")
    one_line_error(cli("compress", swin, "--recipe", recipe, "--out", tmp_path / "run", "--device", "cpu"),
                   "no timm architecture among swin_* has its tensors", "closest", "--model")
    r = cli("inspect", swin, "--recipe", recipe, "--json")  # inspect goes on weight-only and says why
    assert r.code == 0 and json.loads(r.out)["architecture"] is None and "weight-only: " in json.loads(r.out)["notes"][0]


def test_config_json_beside_the_checkpoint_names_it(tmp_path, vit_ckpt):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(vit_ckpt.read_bytes())
    model_args = {k: v for k, v in TINY_VIT_KWARGS.items() if k != "num_classes"}
    (folder / "config.json").write_text(json.dumps({"architecture": TINY_VIT, "num_classes": 10, "model_args": model_args}))
    built = build_model(folder / "model.safetensors")
    assert (built.architecture, built.source, built.model_kwargs["num_classes"]) == (TINY_VIT, "config.json", 10)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(LowrankError, match="config.json: not a valid JSON config"):
        build_model(folder / "model.safetensors")


def test_a_file_that_is_no_vision_model_is_decided_from_the_header_alone(weights_ckpt):
    with pytest.raises(NoArchitecture, match="its tensors are not a timm vision model's"):
        build_model(weights_ckpt, hint=ArchitectureHint("deit_base_patch16_224", {}, ("deit_*",)))


def test_search_infers_settings_and_ranks_identical_structures(tmp_path):
    ckpt = _checkpoint(tmp_path, "swin_tiny_patch4_window7_224", num_classes=0)
    found = get_family("timm").find_architecture(read_header(ckpt), ["swin_*"])
    assert (found.architecture, found.kwargs) == ("swin_tiny_patch4_window7_224", {"num_classes": 0})
    assert found.tried == len(timm.list_models("swin_*"))


def test_why_the_recipes_model_was_not_used_is_said(cli, tmp_path):
    """Issue 17.5: an unknown recipe model, wrong model_kwargs, or a model the tensors do not fit is named in the note."""
    ckpt = _checkpoint(tmp_path, "deit_tiny_patch16_224", num_classes=10, img_size=32)
    found = "using deit_tiny_patch16_224 (num_classes=10, img_size=32) found from the tensors among 1 of deit_tiny_patch16_224"
    cases = {("vit_foo", ()): "recipe model 'vit_foo' is not a timm architecture; ",
             ("deit_tiny_patch16_224", (("embd_dim", 3),)): "recipe model 'deit_tiny_patch16_224' (model_kwargs {'embd_dim': 3}) cannot be built with these settings (TypeError: ",
             ("deit_small_patch16_224", ()): "recipe model 'deit_small_patch16_224' does not fit the tensors ("}
    for (model, kwargs), start in cases.items():
        built = build_model(ckpt, hint=ArchitectureHint(model, dict(kwargs), ("deit_tiny_patch16_224",)))
        assert (built.architecture, built.source) == ("deit_tiny_patch16_224", "search")
        assert built.note.startswith(start) and built.note.endswith(found), built.note
    with pytest.raises(NoArchitecture, match=r"recipe model 'vit_fo' is not a timm architecture, and no architectures were given to search"):
        build_model(ckpt, hint=ArchitectureHint("vit_fo", {}, ()))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: vit_foo\narchitectures: [deit_tiny_patch16_224]\n")
    r = cli("inspect", ckpt, "--recipe", recipe, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["architecture"] == "deit_tiny_patch16_224" and d["notes"][0] == f"recipe model 'vit_foo' is not a timm architecture; {found}"
