"""`compress` one transformer block at a time (`factorize.max_memory`, docs/algorithms.md §12), checked against the
in-memory path on a tiny Llama-style causal LM: the same sensitivity sums and ranks, the same teacher and SVD-only
perplexities, the same local stage, activations spilled to disk giving what memory gives, and the refusals."""

import json
from pathlib import Path

import pytest
import torch

from lowrank_cli import load
from lowrank_cli.data.modality import calibration_for
from lowrank_cli.distill.local import local_batches, local_distill
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.blockwise import ActivationStore, BlockSource, measure_streamed
from lowrank_cli.factorize.model import allocate_on_bases, factorize_model
from lowrank_cli.factorize.sensitivity import layer_sensitivity
from lowrank_cli.factorize.stream import plan_streamed
from lowrank_cli.io.manifest import read_checkpoint
from lowrank_cli.io.safetensors import read_header, read_tensors
from lowrank_cli.models.build import build_model
from lowrank_cli.models.skeleton import hub_skeleton
import lowrank_cli.pipelines.common.streamed as streamed_module
import lowrank_cli.pipelines.factorize as factorize_pipeline
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.pipelines.common.streamed import streamed_compress
from lowrank_cli.pipelines.compress import compress_checkpoint, prepare_compress
from lowrank_cli.recipe import load_recipe

from conftest import one_line_error
from hf_models import hub_model

CALIB = {"calib_data": "pydoc", "calib_samples": 24, "calib_batch_size": 8}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return hub_model(tmp_path_factory.mktemp("src"), "llama-tied", pretrain_steps=30)


def _recipe(max_memory: str | None = "400KB", local_steps: int = 5):
    recipe = load_recipe("causal-lm")
    recipe.factorize = recipe.factorize.model_copy(update={**CALIB, "max_memory": max_memory})
    recipe.data = recipe.data.model_copy(update={"max_length": 64})
    local = recipe.distill.local.model_copy(update={"steps": local_steps, "examples": 16})
    recipe.distill = recipe.distill.model_copy(update={"budget": None, "local": local, "max_steps": 2, "eval_every": 0})
    return recipe


def test_streamed_measurements_are_the_in_memory_ones(folder, tmp_path):
    """Sensitivity c_l and input power of every layer, and the ranks allocated from them with the whitened spectra, as the
    whole model's forward and backward give them."""
    recipe = _recipe()
    built = build_model(folder, None, {})
    family, task = built.family, built.family.task(built.model)
    cal = calibration_for("pydoc", family, built.model, folder, 24, 8, 64)
    names = [p.name for p in plan_streamed(built.model, recipe, family) if p.factorized]
    whole = layer_sensitivity(built.model, names, cal, task=task, call=family.forward)
    in_memory = factorize_model(built.model, recipe, family=family, calibration=cal, device="cpu")

    skeleton, sources = hub_skeleton(read_header(folder), None, {})
    plans = plan_streamed(skeleton.model, recipe, skeleton.family)
    store = ActivationStore(tmp_path / "acts", 0)  # every level on disk
    with read_tensors(read_header(folder)) as reader:
        src = BlockSource(skeleton.model, skeleton.family, reader.get_tensor, sources, torch.device("cpu"))
        sigmas, unit, sens = measure_streamed(src, plans, recipe, cal, task, store)
    assert store.peak_disk > 0 and not list((tmp_path / "acts").iterdir())  # spilled, then removed
    assert set(sens) == set(whole)
    for name, st in whole.items():
        assert sens[name].rows == st.rows and sens[name].input_rows == st.input_rows
        assert sens[name].c == pytest.approx(st.c, rel=1e-4), name
        assert sens[name].input_power == pytest.approx(st.input_power, rel=1e-5), name
    allocate_on_bases(plans, recipe, sigmas.__getitem__, sens, unit)
    assert {p.name: p.rank for p in plans} == {p.name: p.rank for p in in_memory.plans}
    assert len({p.rank for p in plans if p.factorized}) > 3  # the allocation is not uniform


def test_streamed_compress_is_the_in_memory_factorization_and_local_stage(folder, tmp_path):
    """With a small max_memory: the teacher's and the SVD student's perplexities, and the student after the local stage
    (same steps, same draws), as the in-memory run's; the output is a Hub folder `load` opens."""
    recipe = _recipe()
    assert streamed_compress(folder, recipe, None, None) is not None
    report = compress_checkpoint(folder, recipe, device="cpu", out=tmp_path / "streamed")
    assert report["streamed"]["activations_peak_disk"] > 0

    p = prepare_compress(folder, _recipe(max_memory=None), device="cpu", out=tmp_path / "mem")
    from lowrank_cli.distill.evaluate import evaluate

    teacher = evaluate(p.teacher, p.data.val, p.family, "cpu", task=p.task)
    svd = evaluate(p.student, p.data.val, p.family, "cpu", task=p.task)
    cfg = p.recipe.distill
    local_distill(p.student, p.teacher, p.family, local_batches(p.data.train, cfg.local, cfg.seed, cfg.group_by_length), cfg.local,
                  torch.device("cpu"), cfg.seed)
    distilled = evaluate(p.student, p.data.val, p.family, "cpu", task=p.task)
    acc = report["accuracy"]
    assert acc["teacher"]["perplexity"] == pytest.approx(teacher.perplexity, rel=1e-5)
    assert acc["svd"]["perplexity"] == pytest.approx(svd.perplexity, rel=1e-4)
    assert acc["distilled"]["perplexity"] == pytest.approx(distilled.perplexity, rel=1e-3)
    assert acc["distilled"]["perplexity"] != pytest.approx(acc["svd"]["perplexity"], rel=1e-4)  # the local stage changed it

    _, manifest, tensors = read_checkpoint(tmp_path / "streamed")
    state = p.student.state_dict()
    assert set(tensors) == {k for k in state if k != "lm_head.weight"}  # tied: saved once
    for key, value in tensors.items():
        torch.testing.assert_close(value, state[key], rtol=2e-3, atol=2e-4, msg=key)
    assert manifest.layers.keys() == p.manifest.layers.keys()
    model = load(tmp_path / "streamed")
    assert sum(t.numel() for t in model.parameters()) == report["params_after"] < report["params_before"]
    assert not (tmp_path / "streamed" / ".activations").exists()


def test_activations_on_disk_give_what_memory_gives(folder, tmp_path, monkeypatch):
    on_disk = compress_checkpoint(folder, _recipe("400KB", local_steps=2), device="cpu", out=tmp_path / "disk")
    monkeypatch.setattr(streamed_module, "ActivationStore", lambda folder, _limit: ActivationStore(folder, 1 << 40))
    in_memory = compress_checkpoint(folder, _recipe("400KB", local_steps=2), device="cpu", out=tmp_path / "mem")
    assert on_disk["streamed"]["activations_peak_disk"] > 0 and in_memory["streamed"]["activations_peak_disk"] == 0
    assert on_disk["accuracy"] == in_memory["accuracy"]
    a, b = read_checkpoint(tmp_path / "disk")[2], read_checkpoint(tmp_path / "mem")[2]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budget_sizes_each_block(folder, tmp_path):
    recipe = _recipe(local_steps=400)
    recipe.distill = recipe.distill.model_copy(update={"budget": "25s"})
    report = compress_checkpoint(folder, recipe, device="cpu", out=tmp_path / "run")
    b = report["budget"]
    steps = b["local"]["steps"]
    assert len(steps) == 2 and all(recipe.distill.local.min_steps <= s <= 400 for s in steps)
    assert b["local"]["planned_seconds"] < 25 and b["command_seconds"] <= 25 * 1.2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["budget"]["local"]["steps"] == steps


def test_max_memory_below_one_block_is_refused_with_what_it_needs(folder, tmp_path, cli):
    r = cli("compress", str(folder), "--recipe", "causal-lm", "--max-memory", "20KB", "--out", str(tmp_path / "run"))
    line = one_line_error(r, "max_memory 20KB", "less than one block", "at least")
    assert "MB" in line
    assert not (tmp_path / "run").exists()
    r = cli("compress", str(folder), "--recipe", "causal-lm", "--max-memory", "lots", "--out", str(tmp_path / "run"))
    one_line_error(r, "max_memory 'lots'", "1.5GB")
    assert not (tmp_path / "run").exists()


def test_what_streaming_does_not_do_is_refused_before_any_work(folder, tmp_path):
    recipe = _recipe()
    recipe.factorize = recipe.factorize.model_copy(update={"method": "asvd"})
    with pytest.raises(LowrankError, match="asvd.*one block at a time.*raise factorize.max_memory"):
        compress_checkpoint(folder, recipe, device="cpu", out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(LowrankError, match="no run to resume"):
        compress_checkpoint(folder, _recipe(), device="cpu", out=tmp_path / "run", resume=True)


def test_a_killed_run_resumes_from_its_last_finished_block(folder, tmp_path, monkeypatch):
    """A failure in block 1 leaves block 0 finished; resuming replays it and gives the uninterrupted run's student."""
    whole = compress_checkpoint(folder, _recipe(), device="cpu", out=tmp_path / "whole")
    finish = streamed_module.StreamState.finish_block

    def fail_on_block_1(self, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        return finish(self, i, *args)

    with monkeypatch.context() as m:
        m.setattr(streamed_module.StreamState, "finish_block", fail_on_block_1)
        with pytest.raises(KeyboardInterrupt):
            compress_checkpoint(folder, _recipe(), device="cpu", out=tmp_path / "run")
    state = json.loads((tmp_path / "run" / ".stream" / "state.json").read_text())
    assert [r["index"] for r in state["records"]] == [0]
    assert not (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / ".activations").exists()
    with pytest.raises(LowrankError, match="already holds a run"):
        compress_checkpoint(folder, _recipe(), device="cpu", out=tmp_path / "run")
    resumed = compress_checkpoint(folder, _recipe(), device="cpu", out=tmp_path / "run", resume=True)
    assert resumed["accuracy"] == whole["accuracy"]
    assert [b["steps"] for b in resumed["local"]["blocks"]] == [b["steps"] for b in whole["local"]["blocks"]]
    a, b = read_checkpoint(tmp_path / "whole")[2], read_checkpoint(tmp_path / "run")[2]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "run" / ".stream").exists()


def test_a_run_that_fails_before_its_first_block_leaves_nothing(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(streamed_module, "factorize_block", lambda *a, **k: (_ for _ in ()).throw(OSError("No space left on device")))
    with pytest.raises(OSError):
        compress_checkpoint(folder, _recipe(), device="cpu", out=tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any(p.name != ".lock" for p in (tmp_path / "run").iterdir())


def test_factorize_one_block_at_a_time_writes_the_in_memory_checkpoint(folder, tmp_path, monkeypatch):
    """`factorize` with sensitivity-allocated ranks under a small max_memory: the ranks and the factors of the in-memory path."""
    recipe = _recipe("200KB")  # under twice the weights (250 KB), over twice a block (74 KB)
    blocks = factorize_checkpoint(folder, recipe, tmp_path / "blocks")
    assert any("one block at a time" in n for n in blocks.inspection.notes)
    with monkeypatch.context() as m:
        m.setattr(factorize_pipeline, "_blockwise", lambda *a: None)
        with pytest.raises(LowrankError, match="factorize.max_memory 200KB is less than the in-memory factorization"):
            factorize_checkpoint(folder, recipe, tmp_path / "whole")  # a limit given is never ignored
        whole = factorize_checkpoint(folder, _recipe(max_memory=None), tmp_path / "whole")
    assert {n: e.rank for n, e in blocks.manifest.layers.items()} == {n: e.rank for n, e in whole.manifest.layers.items()}
    a, b = read_checkpoint(tmp_path / "blocks")[2], read_checkpoint(tmp_path / "whole")[2]
    assert a.keys() == b.keys()
    for key in a:  # each layer's product of factors (the factors' signs are free), up to Grams summed in another order
        if key.endswith(".down.weight"):
            continue
        if key.endswith(".up.weight"):
            down = key.replace(".up.weight", ".down.weight")
            torch.testing.assert_close(a[key] @ a[down], b[key] @ b[down], rtol=1e-3, atol=1e-4, msg=key)
        else:
            torch.testing.assert_close(a[key], b[key], msg=key)
    assert not list((tmp_path / "blocks").glob(".activations*"))


def test_factorize_with_too_little_memory_for_one_block_says_what_it_needs(folder, tmp_path, cli):
    r = cli("factorize", str(folder), "--recipe", "causal-lm", "--calib-data", "pydoc", "--max-memory", "10KB", "--out", str(tmp_path / "out"))
    one_line_error(r, "factorize.max_memory 10KB", "its teacher and its student", "at least")
    assert not (tmp_path / "out").exists()


def test_several_processes_are_refused_before_the_launcher_builds_the_model(folder, tmp_path, monkeypatch):
    import lowrank_cli.pipelines.common.prepare as prepare_module
    from lowrank_cli.pipelines.compress import check_compress

    monkeypatch.setattr(prepare_module, "build_model", lambda *a, **k: pytest.fail("the launcher built the model"))
    with pytest.raises(LowrankError, match="one block at a time, which runs in one process, not 2"):
        check_compress(folder, _recipe(), out=tmp_path / "run", world=2)
    assert not (tmp_path / "run").exists()


def test_a_damaged_progress_file_is_a_one_line_error(folder, tmp_path, monkeypatch, cli):
    finish = streamed_module.StreamState.finish_block

    def fail_on_block_1(self, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        return finish(self, i, *args)

    monkeypatch.setattr(streamed_module.StreamState, "finish_block", fail_on_block_1)
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(folder, _recipe(), device="cpu", out=tmp_path / "run")
    (tmp_path / "run" / ".stream" / "state.json").write_text("{not json")
    with pytest.raises(LowrankError, match=r"state.json: is not a block-by-block run's progress file"):
        compress_checkpoint(folder, _recipe(), device="cpu", out=tmp_path / "run", resume=True)
    other = _recipe(local_steps=3)
    with pytest.raises(LowrankError, match="another recipe"):  # a failed resume keeps what the run had
        compress_checkpoint(folder, other, device="cpu", out=tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "recipe.yaml").is_file() and (tmp_path / "run" / ".stream" / "block-0000.safetensors").is_file()


def test_the_command_line_reports_a_block_by_block_run(folder, tmp_path, cli):
    import yaml

    recipe = _recipe(max_memory=None, local_steps=2)
    recipe.distill = recipe.distill.model_copy(update={"budget": "1h"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    r = cli("compress", str(folder), "--recipe", str(tmp_path / "r.yaml"), "--max-memory", "400KB", "--out", str(tmp_path / "run"))
    assert r.code == 0, r.err
    assert "one block at a time" in r.err and "Traceback" not in r.err
    assert "perplexity" in r.out and "Time budget" in r.out and "local stage" in r.out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["streamed"]["max_memory"] == 400_000 and report["train"]["end_to_end"].startswith("skipped")


def test_the_machines_memory_alone_sends_only_what_this_path_takes(folder, monkeypatch):
    """Without factorize.max_memory the limit is the available memory: a model over it goes one block at a time, but a
    recipe this path does not take goes in memory as before instead of being refused."""
    monkeypatch.setattr(streamed_module, "available_memory", lambda: 400_000)
    assert streamed_compress(folder, _recipe(max_memory=None), None, None) is not None
    asvd = _recipe(max_memory=None)
    asvd.factorize = asvd.factorize.model_copy(update={"method": "asvd"})
    assert streamed_compress(folder, asvd, None, None) is None
    monkeypatch.setattr(streamed_module, "available_memory", lambda: 10**12)
    assert streamed_compress(folder, _recipe(max_memory=None), None, None) is None


@pytest.mark.parametrize("change, message", [
    (lambda r: r.distill.local.__setattr__("rounds", 2), "distill.local.rounds 2 goes over the blocks again"),
    (lambda r: r.select.__setattr__("include", ["no_such_layer"]), "factorizes no layer"),
    (lambda r: r.select.__setattr__("exclude", ["score"]), "layers outside the transformer blocks (lm_head)"),
], ids=["rounds", "nothing", "outside"])
def test_each_refusal_names_its_key_before_any_work(folder, tmp_path, cli, change, message):
    import yaml

    if "outside" in message:  # an untied head is a planned layer outside the blocks once select.exclude lets it in
        folder = hub_model(tmp_path, "llama")
    recipe = _recipe()
    change(recipe)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    r = cli("compress", str(folder), "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    one_line_error(r, message, "raise factorize.max_memory")
    assert not (tmp_path / "run").exists() or not any(p.name != ".lock" for p in (tmp_path / "run").iterdir())


def test_blocks_with_masks_of_their_own_are_refused(folder, tmp_path, monkeypatch):
    s = streamed_compress(folder, _recipe(), None, None)
    s.built.model.config.layer_types = ["sliding_attention", "full_attention"]
    run = streamed_module.RunDir(tmp_path / "run")
    with pytest.raises(LowrankError, match="masks of their own"):
        streamed_module.compress_streamed(s, folder, _recipe(), run, device="cpu")
    assert not (tmp_path / "run").exists()
