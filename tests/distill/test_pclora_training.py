"""PC-LoRA as a distillation method: recipe, loss gradients, λ in the loop, finalize, resume."""

import copy
import json
import math

import pytest
import torch
import yaml
from conftest import TINY_VIT, TINY_VIT_KWARGS, manifest_of, model_args, one_line_error, tiny_recipe, tiny_vit

import lowrank_cli.pipelines.common.run_loop as run_loop
from lowrank_cli.distill.objective import ProgressiveObjective
from lowrank_cli.factorize import apply_pclora, factorize_model
from lowrank_cli.models import get_family, load
from lowrank_cli.nn import LowRankLinear, PCLoRALinear, decay_lambda, set_lambda
from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.recipe import load_recipe, recipe_from_dict

TIMM = get_family("timm")


def pclora_recipe(tmp_path, **pclora):
    """The tiny ViT recipe of the PELA tests (2 epochs of 4 steps, checkpoints every 3) with PC-LoRA."""
    path = tiny_recipe(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["distill"].update(method="pclora", pclora={"schedule": "sine", "init": "lora", "task_weight": 0.5, **pclora})
    path.write_text(yaml.safe_dump(data))
    return path


def test_kd_term_trains_the_adapters_and_nothing_else():
    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    apply_pclora(student, recipe_from_dict({"factorize": {"kappa": 3}}), init="svd")
    set_lambda(student, 0.5)  # mid-decay: student ≠ teacher, so the KD term is not 0
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    objective = ProgressiveObjective(student, teacher, task_weight=0.0, base="ce", family=TIMM)  # the loss is the KD term alone
    loss, terms = objective(student.train(), x, y)
    assert loss.requires_grad and float(terms["kd"]) > 0
    torch.testing.assert_close(loss.detach(), terms["kd"])
    loss.backward()
    layers = [m for m in student.modules() if isinstance(m, PCLoRALinear)]
    assert len(layers) == 8  # qkv, proj, fc1, fc2 in each of the 2 blocks
    for m in layers:
        for p in (m.down.weight, m.up.weight, m.up.bias):  # A, B and C all learn from the KD term
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert m.frozen_weight.grad is None and m.frozen_bias.grad is None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    objective.close()
    # the weighting: α_task·L_task + (1 − α_task)·L_featKD
    objective = ProgressiveObjective(student, teacher, task_weight=0.3, base="ce", family=TIMM)
    loss, terms = objective(student, x, y)
    torch.testing.assert_close(loss.detach(), 0.3 * terms["task"] + 0.7 * terms["kd"])
    objective.close()


@pytest.mark.parametrize("text,needles", [
    ("distill:\n  method: pclora\n  pclora:\n    schedule: cosine\n", ("distill.pclora.schedule", "'linear', 'sine' or 'one_minus_cosine'", "(got 'cosine')")),
    ("distill:\n  method: pclora\n  pclora:\n    decay_end: 0\n", ("distill.pclora.decay_end", "greater than 0")),
    ("distill:\n  method: pclora\nfactorize:\n  rank_rule: energy\n  energy: 0.9\n", ("adapter ranks from factorize.rank_rule 'kappa' or 'rank'", "(got 'energy')")),
])
def test_bad_pclora_settings_are_one_line_errors(cli, tmp_path, vit_ckpt, text, needles):
    p = tmp_path / "r.yaml"
    p.write_text(f"model: {TINY_VIT}\n" + text)
    out = tmp_path / "run"
    r = cli("compress", vit_ckpt, "--recipe", p, "--out", out)
    one_line_error(r, "r.yaml", *needles)
    assert not out.exists()


def test_distill_of_a_factorized_checkpoint_refuses_pclora(cli, tmp_path, vit_ckpt):
    fact = tmp_path / "vit.k3.safetensors"
    assert cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--kappa", "3", "--out", fact).code == 0
    r = cli("distill", fact, "--teacher", vit_ckpt, "--recipe", pclora_recipe(tmp_path), "--out", tmp_path / "d", "--device", "cpu")
    one_line_error(r, "'pclora' starts from the dense model", "compress the original checkpoint")
    assert not (tmp_path / "d").exists()


def test_compress_pclora_ends_with_a_pela_structured_student(cli, tmp_path, vit_ckpt, monkeypatch):
    """λ reaches 0 exactly after the last step (decay_end 1); the model then and the saved student agree."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    at_zero = {}
    real_finalize = run_loop.finalize

    def finalize(model):  # the model right after λ reached 0, before its frozen branches are dropped
        layers = [m for m in model.modules() if isinstance(m, PCLoRALinear)]
        at_zero["lams"] = {m.lam for m in layers}
        with torch.no_grad():
            at_zero["out"] = model.eval()(x)
        return real_finalize(model)

    monkeypatch.setattr(run_loop, "finalize", finalize)
    out = tmp_path / "run"
    recipe = pclora_recipe(tmp_path, decay_end=1.0)
    r = cli("compress", vit_ckpt, "--recipe", recipe, "--out", out, "--device", "cpu")
    assert r.code == 0, r.err
    assert "PC-LoRA" in r.out and "λ (sine) from 1 to 0 over steps 0–8, 0 from step 8 of 8" in r.out
    assert "λ 0.000" in r.err  # the progress bar's last state
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lams = [m["lam"] for m in metrics]
    assert lams == pytest.approx([decay_lambda("sine", s, 8) for s in range(1, 9)]) and lams[-1] == 0.0 and min(lams[:-1]) > 0
    assert {"task", "kd"} <= set(metrics[0]) and "fd" not in metrics[0]

    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "pclora" and report["pclora"]["zero_at_step"] == 8 and report["pclora"]["lambda_final"] == 0.0
    assert at_zero["lams"] == {0.0}
    # the saved student: a PELA student's structure and manifest, the method recorded
    student = load(out / "student.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(student(x), at_zero["out"], rtol=0, atol=1e-6)
    pela = tiny_vit()
    plans = factorize_model(pela, load_recipe(str(recipe))).plans
    assert list(student.state_dict()) == list(pela.state_dict())
    assert {k: v.shape for k, v in student.state_dict().items()} == {k: v.shape for k, v in pela.state_dict().items()}
    assert sum(isinstance(m, LowRankLinear) for m in student.modules()) == 8
    assert not any(isinstance(m, PCLoRALinear) for m in student.modules())
    manifest = manifest_of(out / "student.safetensors")
    assert {n: {**e, "method": "svd"} for n, e in manifest["layers"].items()} == {p.name: {"rank": p.rank, "d_in": p.d_in, "d_out": p.d_out, "bias": p.bias, "rule": p.rule, "method": "svd"} for p in plans if p.factorized}
    assert {e["method"] for e in manifest["layers"].values()} == {"pclora"}
    assert manifest["distill"]["method"] == "pclora" and manifest["distill"]["decay_steps"] == 8 and manifest["distill"]["steps"] == 8
    assert report["params_after"] == sum(p.numel() for p in pela.parameters())
    # `evaluate` takes it as it takes a PELA student
    r = cli("evaluate", out / "student.safetensors", "--data", "synthetic", "--teacher", vit_ckpt, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["factorized"] is True


@pytest.mark.slow
def test_resume_in_the_middle_of_the_decay(tmp_path, vit_ckpt):
    recipe = load_recipe(str(pclora_recipe(tmp_path, decay_end=0.75)))  # λ = 0 from step 6 of 8
    full = compress_checkpoint(vit_ckpt, recipe, out=tmp_path / "full", device="cpu")
    assert full["pclora"]["decay_steps"] == 6

    def interrupt(pos):
        if pos.step == 5:  # checkpoint at step 3 (λ = 0.5): steps 4 and 5 are lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(vit_ckpt, recipe, out=tmp_path / "cut", device="cpu", step_hook=interrupt)
    cut = tmp_path / "cut"
    assert decay_lambda("sine", 3, 6) == pytest.approx(1 - math.sin(math.pi / 4))
    assert json.loads((cut / "run.json").read_text())["pclora"] == {"decay_steps": 6}
    resumed = compress_checkpoint(vit_ckpt, recipe, out=cut, device="cpu", resume=True)
    a, b = load(tmp_path / "full" / "student.safetensors"), load(cut / "student.safetensors")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)
    assert resumed["rank_weight_sha256"] == full["rank_weight_sha256"]
    lines = lambda p: {r["step"]: (r["loss"], r["lam"]) for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    full_m, cut_m = lines(tmp_path / "full"), lines(cut)
    assert set(cut_m) == set(range(1, 9))
    for s in range(1, 9):
        assert math.isclose(full_m[s][0], cut_m[s][0], rel_tol=1e-6) and full_m[s][1] == cut_m[s][1]
