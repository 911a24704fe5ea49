"""The block runner (both families) and local (block-wise) distillation."""

import copy
import json

import pytest
import timm
import torch
from conftest import TINY_SWIN, TINY_SWIN_KWARGS, tiny_recipe, tiny_vit
from hf_models import hub_model

from lowrank_cli.data.images import digits
from lowrank_cli.distill.local import local_batches, local_distill, normalized_error
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize import factorize_model
from lowrank_cli.models import build_model, get_family
from lowrank_cli.models.blocks import BlockRunner
from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.recipe import LocalConfig, Recipe, load_recipe, recipe_from_dict


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {kind: hub_model(root, kind) for kind in ("bert", "gpt2", "llama")}


def _replay_last(family, model, inputs):
    """The last block's output by replaying every block from the first one's input."""
    runner = BlockRunner(family, model)
    hidden, call = runner.first_input(inputs)
    for i in range(len(runner.blocks)):
        hidden = call(runner.block(i), runner.link(i, hidden) if i else hidden)
    return hidden


@pytest.mark.parametrize("kind", ["vit", "swin", "bert", "gpt2", "llama"])
def test_replaying_the_blocks_gives_the_models_own_block_outputs(kind, hub):
    if kind in ("vit", "swin"):
        torch.manual_seed(0)
        model = tiny_vit() if kind == "vit" else timm.create_model(TINY_SWIN, pretrained=False, **TINY_SWIN_KWARGS).eval()
        family = get_family("timm")
    else:
        built = build_model(hub[kind] / "model.safetensors")
        model, family = built.model, built.family
    inputs = family.example_inputs(model, 3, generator=torch.Generator().manual_seed(1), seq_len=9)
    if isinstance(inputs, dict):
        inputs["attention_mask"][0, 6:] = 0  # a padded document: the mask must travel with the replay
    runner = BlockRunner(family, model)
    runner.check(inputs)  # raises if the chain does not reproduce the forward
    outputs = []
    handle = runner.block(len(runner.blocks) - 1).register_forward_hook(lambda _m, _a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        family.forward(model, inputs)
    handle.remove()
    torch.testing.assert_close(_replay_last(family, model, inputs), outputs[0], rtol=1e-5, atol=1e-5)
    if kind == "swin":  # patch merging between the stages is the link before the second stage's first block
        assert [link is not None for link in runner.links] == [False, True]


def test_a_chain_that_does_not_reproduce_the_forward_is_refused(monkeypatch):
    model, family = tiny_vit(), get_family("timm")
    monkeypatch.setattr(type(family), "block_links", lambda self, m: [None, torch.nn.Linear(64, 64)])
    with pytest.raises(LowrankError, match=r"blocks\.1's input is not the previous block's output.*distill\.local"):
        BlockRunner(family, model).check(family.example_inputs(model, 2))


def test_each_block_learns_to_reproduce_its_teacher_block():
    """κ = 4 SVD student of a tiny ViT on real digits: every block's error falls, and so does the last block's output error."""
    torch.manual_seed(0)
    teacher, family = tiny_vit(), get_family("timm")
    student = copy.deepcopy(teacher)
    factorize_model(student, Recipe(factorize={"kappa": 4}), family=family)
    data = digits(family.data_config(teacher))
    cfg = LocalConfig(steps=40, examples=128, batch_size=32, lr=3e-3)
    held = data.val.images[:64]

    def last_error():
        with torch.no_grad():
            return float(normalized_error(_replay_last(family, student, held), _replay_last(family, teacher, held), None))

    before = last_error()
    result = local_distill(student, teacher, family, local_batches(data.train, cfg, seed=0), cfg, torch.device("cpu"))
    assert [b["block"] for b in result.blocks] == ["blocks.0", "blocks.1"]
    assert all(b["error_after"] < 0.7 * b["error_before"] for b in result.blocks), result.blocks
    assert all(p.grad is None for p in student.parameters())  # the end-to-end stage starts from clean gradients
    assert result.examples == 128 and result.tokens == 128 * 17
    assert last_error() < 0.7 * before  # on held-out digits
    # the teacher's weights are untouched
    torch.testing.assert_close(teacher.state_dict()["blocks.0.mlp.fc1.weight"], tiny_vit().state_dict()["blocks.0.mlp.fc1.weight"])


def test_local_stage_on_a_text_model_counts_real_tokens_only(hub):
    built = build_model(hub["llama"] / "model.safetensors")
    teacher, family = built.model, built.family
    student = copy.deepcopy(teacher)
    factorize_model(student, Recipe(factorize={"kappa": 4}, select={"exclude": ["lm_head"]}), family=family)
    inputs = family.example_inputs(teacher, 4, generator=torch.Generator().manual_seed(0), seq_len=12)
    inputs["attention_mask"][:, 8:] = 0
    cfg = LocalConfig(steps=20, examples=4, batch_size=2)
    result = local_distill(student, teacher, family, [dict(inputs)], cfg, torch.device("cpu"))
    assert result.tokens == 4 * 8
    assert all(b["error_after"] < b["error_before"] for b in result.blocks)


def test_recipe_keys_and_refusals():
    r = recipe_from_dict({"distill": {"local": {"steps": 10}, "eval_every": 5}})
    assert r.distill.local.steps == 10 and r.distill.local.inputs == "student" and r.distill.eval_every == 5
    with pytest.raises(LowrankError, match="distill.local"):
        recipe_from_dict({"distill": {"method": "pclora", "local": {}}})
    with pytest.raises(LowrankError, match=r"distill\.local\.inputs"):
        recipe_from_dict({"distill": {"local": {"inputs": "both"}}})


def test_compress_with_a_local_stage_reports_the_curve(tmp_path, vit_ckpt):
    recipe = load_recipe(tiny_recipe(tmp_path, eval_every=2, local={"steps": 5, "examples": 32, "batch_size": 16}))
    logged = []
    report = compress_checkpoint(vit_ckpt, recipe, out=tmp_path / "run", device="cpu", log=logged.append)
    stages = [p["stage"] for p in report["curve"]]
    assert stages == ["local", "train", "train", "train", "final"]  # 8 steps, every 2; the final evaluation at step 8
    assert [p["step"] for p in report["curve"]] == [0, 2, 4, 6, 8]
    assert all(p["seconds"] > 0 and p["eval"]["top1"] is not None for p in report["curve"])
    assert [p["seconds"] for p in report["curve"]] == sorted(p["seconds"] for p in report["curve"])
    assert len(report["local"]["blocks"]) == 2 and report["local"]["examples"] == 32
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval" in m for m in metrics) == 4 and sum(m.get("stage") == "local" and "error_after" in m for m in metrics) == 2
    assert sum(r.get("stage") == "local" and "done" in r for r in logged) == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["local"]["examples"] == 32
