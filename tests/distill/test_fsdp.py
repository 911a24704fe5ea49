"""`distill.strategy: fsdp` (FSDP2) on the CPU with gloo: 2 processes against 1 at the same global batch, an exact
resume, a resume on another number of processes, and the one-line refusals (issue 18, item 1)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import one_line_error, tiny_recipe

from lowrank_cli.distill.fsdp import _fill, _skeleton
from lowrank_cli.io.rundir import load_training_state
from lowrank_cli.models import load
from lowrank_cli.pipelines.compress import compress_checkpoint, with_run_options
from lowrank_cli.recipe import load_recipe, recipe_from_dict

WORKER = Path(__file__).with_name("_fsdp_worker.py")


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load(path).state_dict()


@pytest.mark.slow
def test_two_fsdp_processes_train_as_one_and_resume_exactly(tmp_path, vit_ckpt):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    # PC-LoRA: frozen dense weights beside trained adapters in the same blocks; held-out evaluations during training
    settings = {"strategy": "fsdp", "method": "pclora", "eval_every": 4, "eval_examples": 16}
    two = tiny_recipe(tmp_path / "two", batch_size=8, **settings)  # 2 × 8: the global batch of one process of 16
    one = tiny_recipe(tmp_path / "one", batch_size=16, **settings)
    single = compress_checkpoint(vit_ckpt, load_recipe(str(one)), out=tmp_path / "run1", device="cpu")

    proc = torchrun(2, vit_ckpt, two, tmp_path / "run2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert report["world_size"] == 2 and report["train"]["global_batch"] == 16 == single["train"]["global_batch"]
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["strategy"] == "fsdp"
    # the same losses (the logged loss is the global batch's, averaged over the processes) and the same student
    a, b = losses(tmp_path / "run1"), losses(tmp_path / "run2")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(math.isclose(a[s], b[s], rel_tol=1e-5) for s in a), (a, b)
    s1, s2 = weights(tmp_path / "run1" / "student.safetensors"), weights(tmp_path / "run2" / "student.safetensors")
    assert s1.keys() == s2.keys()  # the gathered student is the file one process writes
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=1e-4, msg=k)
    evals = lambda run: [r["eval"]["top1"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval" in r]  # noqa: E731
    assert len(evals(tmp_path / "run2")) == 2 and evals(tmp_path / "run2") == evals(tmp_path / "run1")  # steps 0 and 4
    # each process holds half the parameters and optimizer state, and gradients of the adapters only
    shards, whole = report["train"]["state_bytes"], single["train"]["state_bytes"]
    assert shards["params"] < 0.6 * whole["params"] and shards["optimizer"] < 0.6 * whole["optimizer"]
    assert shards["grads"] < 0.6 * whole["grads"] and whole["grads"] < 0.5 * whole["params"]
    # checkpoints are whole: the student loads alone, the optimizer state is one process's (by index, full size)
    ckpt = tmp_path / "run2" / "checkpoint-000003.safetensors"
    mid, mid1 = load_file(ckpt), load_file(tmp_path / "run1" / "checkpoint-000003.safetensors")  # PC-LoRA's, with the dense weights
    assert mid.keys() == mid1.keys() and all(mid[k].shape == mid1[k].shape for k in mid)
    state, reference = (load_training_state(run / "checkpoint-000003.state.safetensors") for run in (tmp_path / "run2", tmp_path / "run1"))
    assert state.optimizer["state"].keys() == reference.optimizer["state"].keys()
    for i, moments in state.optimizer["state"].items():
        torch.testing.assert_close(moments["exp_avg"], reference.optimizer["state"][i]["exp_avg"], rtol=1e-3, atol=1e-7)

    # what a kill after step 5 leaves (checkpoints up to step 3, metrics up to step 5, no student), resumed on 2 processes:
    # the uninterrupted run, exactly (tests/benchmarks/bench_fsdp.py --sweep kills real runs at every step)
    cut, other = tmp_path / "cut", tmp_path / "other"
    shutil.copytree(tmp_path / "run2", cut)
    for p in [*cut.glob("checkpoint-00000[68]*"), cut / "student.safetensors", cut / "report.json"]:
        p.unlink()
    shutil.copytree(cut, other)
    proc = torchrun(2, vit_ckpt, two, cut, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(cut) == b
    for k, v in weights(cut / "student.safetensors").items():
        assert torch.equal(v, s2[k]), k

    # resumed on one process: the shards of the saved state are whole again, and the run goes on (with a global batch of 8 now)
    resumed = compress_checkpoint(vit_ckpt, load_recipe(str(two)), out=other, device="cpu", resume=True)
    assert resumed["world_size"] == 1 and resumed["train"]["steps"] == 16 and resumed["train"]["global_batch"] == 8
    assert [losses(other)[s] for s in (1, 2, 3)] == [b[s] for s in (1, 2, 3)]
    assert all(math.isfinite(v) for v in losses(other).values())


def test_unknown_strategy_and_a_strategy_change_on_resume_are_one_line_errors(cli, tmp_path, vit_ckpt):
    recipe = tiny_recipe(tmp_path, max_steps=3, checkpoint_every=3)
    out = tmp_path / "run"
    r = cli("compress", vit_ckpt, "--recipe", recipe, "--out", out, "--device", "cpu", "--strategy", "zero", "--nproc", "2")
    one_line_error(r, "'--strategy': 'zero' is not one of 'ddp', 'fsdp'", code=2)
    assert not out.exists()
    r = cli("compress", vit_ckpt, "--recipe", recipe, "--out", out, "--device", "cpu", "--json")  # DDP's run (here one process)
    assert r.code == 0, r.err
    assert json.loads((out / "run.json").read_text())["strategy"] == "ddp"
    r = cli("compress", vit_ckpt, "--recipe", recipe, "--out", out, "--device", "cpu", "--strategy", "fsdp", "--resume", "--nproc", "2")
    one_line_error(r, "trained with distill.strategy 'ddp', now 'fsdp'", "(option --strategy)")
    # a run written before distill.strategy existed was DDP's: it resumes without it
    saved = (out / "recipe.yaml").read_text()
    (out / "recipe.yaml").write_text(saved.replace("  strategy: ddp\n", ""))
    assert "strategy" not in (out / "recipe.yaml").read_text()
    r = cli("compress", vit_ckpt, "--recipe", recipe, "--out", out, "--device", "cpu", "--resume", "--strategy", "ddp")
    assert r.code == 0, r.err


def test_what_fsdp_cannot_shard_is_refused_in_the_recipe(tmp_path):
    base = load_recipe(str(tiny_recipe(tmp_path))).to_dict()
    for distill, needle in (({"amp": "fp16"}, "distill.amp bf16 or none"), ({"beta": 1.0}, "distill.beta")):
        with pytest.raises(Exception, match=needle):
            recipe_from_dict({**base, "distill": {**base["distill"], **distill, "strategy": "fsdp"}})
    with pytest.raises(Exception, match="distill.amp bf16 or none"):
        with_run_options(recipe_from_dict({**base, "distill": {**base["distill"], "amp": "fp16"}}), strategy="fsdp")
    assert with_run_options(load_recipe(str(tiny_recipe(tmp_path))), strategy="fsdp").distill.strategy == "fsdp"


def test_the_skeleton_costs_no_memory_keeps_ties_and_drops_forward_hooks():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, tie_word_embeddings=True))
    seen = []
    model.model.layers[0].register_forward_hook(lambda *a: seen.append(1))
    skeleton = _skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    restored = _fill(skeleton, model.state_dict())
    assert restored.lm_head.weight is restored.model.embed_tokens.weight
    x = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(restored(x).logits, model(x).logits)
    assert len(seen) == 1  # the model's own forward only: the copy has no hooks
