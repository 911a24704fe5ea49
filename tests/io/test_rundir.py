"""Run folders stay clean: one writer at a time, nothing half-made on failure, outputs that cannot be written named."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS, model_args, one_line_error, tiny_recipe
from safetensors import SafetensorError

import lowrank_cli.io.safetensors as st
from lowrank_cli.errors import LowrankError
from lowrank_cli.io.rundir import RunDir
from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.recipe import load_recipe


def test_a_second_writer_is_refused_and_named_and_a_dead_ones_lock_taken_over(tmp_path, cli, vit_ckpt):
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = RunDir(out)
        out.mkdir()
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "2026-11-22T10:00:00", "token": "t"}))
        r = cli("compress", vit_ckpt, "--recipe", tiny_recipe(tmp_path), "--out", out, "--device", "cpu")
        one_line_error(r, str(out), f"another lowrank process (pid {sleeper.pid} on {socket.gethostname()}, started 2026-11-22T10:00:00)")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
        with pytest.raises(LowrankError, match="is writing this run"):
            with run.locked():
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone (a crash, kill -9): its lock no longer blocks the folder
    with run.locked():
        held = json.loads((out / ".lock").read_text())
        assert held["pid"] == os.getpid() and os.environ["LOWRANK_RUN_LOCK"] == held["token"]
        with run.locked():  # what a process started under this lock (torchrun) does: share it
            pass
        assert (out / ".lock").exists()
    assert not (out / ".lock").exists() and "LOWRANK_RUN_LOCK" not in os.environ


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, vit_ckpt):
    recipe = load_recipe(str(tiny_recipe(tmp_path)))

    def fail(pos):
        if pos.step == 2:  # the first checkpoint is at step 3
            raise RuntimeError("the machine fell over")

    with pytest.raises(RuntimeError):
        compress_checkpoint(vit_ckpt, recipe, out=tmp_path / "run", device="cpu", step_hook=fail)
    assert not (tmp_path / "run").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        compress_checkpoint(vit_ckpt, recipe, out=existing, device="cpu", step_hook=fail)
    assert existing.is_dir() and list(existing.iterdir()) == []  # the user's own folder stays, empty


def _disk_full(real):
    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # a partly written file, as a full disk leaves it
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
    return save_file


def test_a_full_disk_is_one_line_and_leaves_no_output(cli, tmp_path, vit_ckpt, monkeypatch):
    monkeypatch.setattr(st, "save_file", _disk_full(st.save_file))
    out = tmp_path / "f.safetensors"
    line = one_line_error(cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out), str(out), "cannot be written")
    assert line.endswith("cannot be written (No space left on device) (option --out)") and sorted(p.name for p in tmp_path.iterdir()) == ["vit.safetensors"]
    run = tmp_path / "run"
    r = cli("compress", vit_ckpt, "--recipe", tiny_recipe(tmp_path), "--out", run, "--device", "cpu")
    assert r.code == 1 and "Traceback" not in r.err  # progress notes, then the error as the last line
    assert r.err.strip().splitlines()[-1] == f"error: {run}/checkpoint-000003.safetensors: cannot be written (No space left on device) (option --out)"
    assert not run.exists()  # the first checkpoint failed: no half-made run
    one_line_error(cli("convert", tmp_path / "x.pth"), "no such file")


def test_an_unwritable_output_folder_is_one_line(cli, tmp_path, vit_ckpt, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # as a read-only folder answers (root ignores chmod)
    out = tmp_path / "ro" / "f.safetensors"
    out.parent.mkdir()
    for args in (("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out),
                 ("export", "--format", "dense", "--out", out)):
        r = cli(*args)
        assert r.code == 1 and "Traceback" not in r.err
    one_line_error(cli("factorize", vit_ckpt, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out), str(out), "cannot be written (Permission denied)")
    torch.save({"w": torch.zeros(2)}, tmp_path / "m.pth")
    one_line_error(cli("convert", tmp_path / "m.pth", "--out", out), "cannot be written (Permission denied)")
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(tmp_path, vit_ckpt):
    """Two `compress` at the same moment with the same --out: one runs, the other refuses; the folder is one run's."""
    out = tmp_path / "run"
    for k in (2, 3):
        (tmp_path / f"r{k}").mkdir()
    recipes = [tiny_recipe(tmp_path / f"r{k}", epochs=1) for k in (2, 3)]
    for r, k in zip(recipes, (2, 3)):
        r.write_text(r.read_text().replace("kappa: 3", f"kappa: {k}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "lowrank_cli", "compress", str(vit_ckpt), "--recipe", str(r), "--out", str(out),
                               "--device", "cpu", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in recipes]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, _, err in results if code == 1)
    assert "another lowrank process" in loser or "already holds a run" in loser, loser
    winner = json.loads(next(o for code, o, _ in results if code == 0))
    kappa = load_recipe(str(out / "recipe.yaml")).factorize.kappa
    student = json.loads(st.read_header(out / "student.safetensors").metadata["lowrank"])
    assert student["recipe"]["factorize"]["kappa"] == kappa and winner["student"] == str(out / "student.safetensors")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one run's lines, none interleaved


def test_the_lock_file_does_not_count_as_content(tmp_path):
    run = RunDir(tmp_path / "r")
    with run.locked():
        run.check_new()
    assert not (tmp_path / "r").exists()  # created for the lock, removed with it

