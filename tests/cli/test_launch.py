"""`--nproc`, `--nnodes`, `--node-rank`, `--rdzv-endpoint`: checked before any process starts or any file is written."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import one_line_error, tiny_recipe

import lowrank_cli.cli.launch as launch
from lowrank_cli.distill.distributed import torchrun_command


@pytest.fixture
def no_launch(monkeypatch):
    """torchrun must not be started: fail the test if it is."""
    def refuse(*a, **k):
        raise AssertionError(f"torchrun started: {a}")
    monkeypatch.setattr(launch, "launch_torchrun", refuse)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("command", ["compress", "distill"])
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_nproc_above_the_visible_gpus_is_refused_before_launch(cli, tmp_path, vit_ckpt, two_gpus, no_launch, command, device):
    out = tmp_path / "run"
    head = ["compress", vit_ckpt] if command == "compress" else ["distill", vit_ckpt, "--teacher", vit_ckpt]
    r = cli(*head, "--recipe", tiny_recipe(tmp_path), "--out", out, "--device", device, "--nproc", "4")
    line = one_line_error(r, "--nproc 4 but 2 CUDA device(s) (GPUs) are visible", "start at most 2 processes per node")
    assert line.count("error") == 1 and not out.exists()


def test_nproc_up_to_the_gpu_count_and_the_cpu_pass_the_check(two_gpus):
    launch.check(2, "cuda")
    launch.check(8, "cpu")  # CPU processes: no limit here
    launch.check(None, "cuda")


@pytest.mark.parametrize("extra, needles, code", [
    (["--nnodes", "2"], ["--rdzv-endpoint is needed with 2 nodes", "HOST:PORT"], 1),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29500"], ["--node-rank 2 is outside 0..1 (2 nodes)"], 1),
    (["--node-rank", "1"], ["--node-rank 1 is outside 0..0 (1 node)"], 1),
    (["--nnodes", "2", "--rdzv-endpoint", "node0"], ["--rdzv-endpoint 'node0' is not HOST:PORT"], 1),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:70000"], ["'node0:70000' is not HOST:PORT", "1 to 65535"], 1),
    (["--nnodes", "2", "--rdzv-endpoint", "::1:29500"], ["'::1:29500' is not HOST:PORT"], 1),
    (["--nnodes", "2", "--rdzv-endpoint", ":29500"], ["':29500' is not HOST:PORT"], 1),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--resume"], ["--resume with 2 nodes is not supported", "resume on one node"], 1),
    (["--nnodes", "0"], ["'--nnodes'"], 2),
    (["--node-rank", "-1"], ["'--node-rank'"], 2),
])
def test_bad_multi_node_options_are_one_line_errors(cli, tmp_path, vit_ckpt, no_launch, extra, needles, code):
    out = tmp_path / "run"
    r = cli("compress", vit_ckpt, "--recipe", tiny_recipe(tmp_path), "--out", out, "--device", "cpu", *extra)
    one_line_error(r, *needles, code=code)
    assert not out.exists()


def test_torchrun_command_standalone_or_static_rendezvous():
    argv = ["compress", "x.safetensors", "--json"]
    cmd = torchrun_command(2, argv)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lowrank_cli", *argv]
    cmd = torchrun_command(1, argv, nnodes=3, node_rank=2, rdzv_endpoint="[fe80::1]:1234")
    assert cmd[3:8] == ["--nnodes=3", "--node_rank=2", "--master_addr=fe80::1", "--master_port=1234", "--nproc_per_node=1"]


def test_relaunch_drops_every_launch_option():
    argv = ["compress", "--nproc", "2", "--nnodes=2", "--node-rank", "1", "--rdzv-endpoint", "h:1", "--model-arg", "depth=2",
            "--rdzv-endpoint=h:2", "--json"]
    assert launch.argv_without_launch(argv) == ["compress", "--model-arg", "depth=2", "--json"]
    assert launch.launches(1, 2) and launch.launches(2, 1) and not launch.launches(1, 1) and not launch.launches(None, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_machine(tmp_path, vit_ckpt):
    """Two `compress --nnodes 2` commands, node ranks 0 and 1, one process each, meet at one endpoint (gloo)."""
    recipe = tiny_recipe(tmp_path, epochs=1, max_steps=2, checkpoint_every=0)
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "lowrank_cli", "compress", str(vit_ckpt), "--recipe", str(recipe), "--out",
                               str(tmp_path / f"node{k}"), "--device", "cpu", "--nproc", "1", "--nnodes", "2", "--node-rank", str(k),
                               "--rdzv-endpoint", endpoint, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for k in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    report = json.loads(outs[0][0])
    assert report["world_size"] == 2 and report["train"]["global_batch"] == 32 and report["train"]["steps"] == 2
    digests = report["rank_weight_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (tmp_path / "node0" / "student.safetensors").exists() and not (tmp_path / "node1" / "student.safetensors").exists()
    assert outs[1][0].strip() == ""  # node 1's process is rank 1: no report


@pytest.mark.parametrize("command", ["compress", "distill"])
def test_too_little_data_for_every_process_is_refused_before_torchrun(cli, tmp_path, vit_ckpt, no_launch, command):
    """64 synthetic images at batch 16 make 2 steps for 2 processes, none for 8: a one-line error before any process starts."""
    head = ["compress", vit_ckpt]
    if command == "distill":
        fact = tmp_path / "f.safetensors"
        assert cli("factorize", vit_ckpt, "--recipe", tiny_recipe(tmp_path), "--out", fact).code == 0
        head = ["distill", fact, "--teacher", vit_ckpt]
    out = tmp_path / "run"
    one_line_error(cli(*head, "--recipe", tiny_recipe(tmp_path), "--out", out, "--device", "cpu", "--nproc", "8"),
                   "fewer than one step of 128 (distill.batch_size × processes × distill.accum_steps)")
    assert not out.exists()


def test_the_launcher_checks_compress_without_factorizing(cli, tmp_path, vit_ckpt, monkeypatch):
    """The launcher builds nothing it would hold while torchrun runs: no calibration, no factorization."""
    import lowrank_cli.pipelines.common.prepare as prepare

    calls = []
    monkeypatch.setattr(prepare, "factorize_model", lambda *a, **k: calls.append("factorize"))
    monkeypatch.setattr(prepare, "calibration_for", lambda *a, **k: calls.append("calibrate"))
    monkeypatch.setattr(launch, "launch_torchrun", lambda *a, **k: calls.append("torchrun") or 0)
    r = cli("compress", vit_ckpt, "--recipe", tiny_recipe(tmp_path), "--out", tmp_path / "run", "--device", "cpu", "--nproc", "2")
    assert r.code == 0, r.err
    assert calls == ["torchrun"]


def test_a_recipe_that_selects_nothing_is_refused_before_torchrun(cli, tmp_path, vit_ckpt, no_launch):
    recipe = tiny_recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "select:\n  include: [no_such_layer]\n")
    out = tmp_path / "run"
    one_line_error(cli("compress", vit_ckpt, "--recipe", recipe, "--out", out, "--device", "cpu", "--nproc", "2"),
                   "recipe 'tiny' factorizes no layer of vit_tiny_patch16_224; nothing to distill")
    assert not out.exists()


def test_the_processes_count_a_budget_from_the_launchers_start(monkeypatch):
    """Under torchrun the clock of `--budget` is the launching command's: its start, passed on in the environment."""
    import time

    import lowrank_cli.cli.app as app

    monkeypatch.setenv(app.STARTED_ENV, repr(time.time() - 100.0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    app._start_clock()
    assert time.perf_counter() - app.command_started() == pytest.approx(100.0, abs=1.0)
    monkeypatch.setenv("WORLD_SIZE", "1")  # outside torchrun a stale value is ignored: the clock starts now
    app._start_clock()
    assert time.perf_counter() - app.command_started() < 1.0
    assert abs(app.command_started_unix() - time.time()) < 1.0
