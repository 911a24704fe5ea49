"""The CUDA path: factorize on the GPU, distillation in bf16 and fp16 (grad scaler) with exact resume, torchrun,
export of a GPU-trained student, bench and latency-aware selection on CUDA, and the demo on the GPU against the CPU.

Every test is marked `cuda` and skipped without a GPU. On a GPU machine:

    python -m pytest -q -m cuda tests/gpu

`LOWRANK_CUDA_TESTS_DEVICE=cpu` runs the same tests on the CPU: a check of the tests themselves
(the APIs they call, their set-up), not of CUDA; the CUDA-only assertions are skipped then.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import yaml
from conftest import TINY_VIT, TINY_VIT_KWARGS, calibration, manifest_of, model_args, tiny_vit
from safetensors.torch import save_file

import lowrank_cli.decompose.whiten as whiten_module
import lowrank_cli.factorize.model as factorize_module
import lowrank_cli.measure.timing as timing_module
import lowrank_cli.pipelines.bench as bench_module
from lowrank_cli.factorize import factorize_model
from lowrank_cli.io.rundir import load_training_state
from lowrank_cli.measure import count_macs
from lowrank_cli.models import get_family, load
from lowrank_cli.nn import LowRankLinear
from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.recipe import load_recipe, recipe_from_dict

# the packages export functions of these modules' names (`svd`, `train`), which `import ... as` would give
svd_module = importlib.import_module("lowrank_cli.decompose.svd")
train_module = importlib.import_module("lowrank_cli.distill.train")
DEVICE = os.environ.get("LOWRANK_CUDA_TESTS_DEVICE", "cuda")
ON_GPU = torch.device(DEVICE).type == "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs CUDA")]
gpu_only = pytest.mark.skipif(not ON_GPU, reason="asserts what only a GPU run shows")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STEPS, CHECKPOINT_EVERY, INTERRUPT_AT = 40, 15, 20


# --- helpers ------------------------------------------------------------------------------------

@pytest.fixture
def fp32_exact():
    """No TF32 in cuBLAS and cuDNN for the test: fp32 on the GPU as on the CPU."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def deterministic(monkeypatch):
    """Deterministic kernels where torch has them (a warning where it has none), restored afterwards."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def digits_recipe(tmp_path: Path, amp: str = "bf16", **distill) -> Path:
    """The tiny ViT distilled on digits by feature distillation alone (its loss falls tenfold in 40 steps on the CPU)."""
    cfg = {"epochs": 1, "max_steps": STEPS, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 0.1, "base_loss": "none", "amp": amp,
           "log_every": 1, "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 10, **distill}
    path = tmp_path / f"digits-{amp}.yaml"
    path.write_text(yaml.safe_dump({"name": f"gpu-{amp}", "model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS, "factorize": {"kappa": 3},
                                    "data": {"source": "digits", "num_workers": 0}, "distill": cfg}))
    return path


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def run_device(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["device"]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Equal on the CPU; on the GPU equal up to the order of floating-point sums (atomics in some backward kernels).

    A resume that lost the optimizer state, the data order or the RNG moves most weights by about
    the learning rate (1e-3): far above these bounds.
    """
    diffs = torch.cat([(va.float() - vb.float()).abs().flatten() for va, vb in zip(a.state_dict().values(), b.state_dict().values())])
    assert list(a.state_dict()) == list(b.state_dict())
    if not ON_GPU:
        assert diffs.max().item() <= 1e-6
        return
    assert diffs.mean().item() <= 1e-5, diffs.mean().item()
    assert (diffs > 1e-4).float().mean().item() <= 0.01, (diffs > 1e-4).float().mean().item()


@contextlib.contextmanager
def svd_on(device: str):
    """The library's SVDs forced onto `device` (it looks `svd_device` up in these modules at each call)."""
    saved = [(m, m.svd_device) for m in (svd_module, whiten_module, factorize_module)]
    for m, _ in saved:
        m.svd_device = lambda _given=None: torch.device(device)
    try:
        yield
    finally:
        for m, f in saved:
            m.svd_device = f


@pytest.fixture
def svd_devices(monkeypatch) -> list[str]:
    """The device type of every torch.linalg.svd call the test makes."""
    seen: list[str] = []
    real = torch.linalg.svd

    def spy(a, *args, **kwargs):
        seen.append(a.device.type)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    return seen


# --- factorize ----------------------------------------------------------------------------------

FACTORIZE = {
    "kappa": {"factorize": {"kappa": 2}},
    "energy": {"factorize": {"rank_rule": "energy", "energy": 0.5}},
    "whitened": {"factorize": {"method": "whitened", "kappa": 2}},
}


@pytest.mark.parametrize("where", ["svd_on_gpu", "model_on_gpu"])
@pytest.mark.parametrize("method", list(FACTORIZE))
def test_factorize_on_the_gpu_equals_the_cpu(method, where, svd_devices, fp32_exact):
    """The GPU's factors give the CPU's weights to fp32 tolerance (U and V themselves may differ in sign)."""
    recipe = recipe_from_dict({"select": {"exclude": ["norm", "head", "patch_embed"]}, **FACTORIZE[method]})
    family = get_family("timm")
    model = tiny_vit()
    calib = calibration("synthetic", model, 64, 16) if method == "whitened" else None
    ref = copy.deepcopy(model)
    with svd_on("cpu"):
        ref_plans = factorize_model(ref, recipe, family=family, calibration=calib).plans
    assert set(svd_devices) == {"cpu"}
    svd_devices.clear()
    gpu = copy.deepcopy(model).to(DEVICE) if where == "model_on_gpu" else copy.deepcopy(model)
    plans = factorize_model(gpu, recipe, family=family, calibration=calib).plans
    assert svd_devices and set(svd_devices) == {torch.device(DEVICE).type}  # the library put its SVDs on the GPU
    assert [(p.name, p.factorized, p.rank) for p in plans] == [(p.name, p.factorized, p.rank) for p in ref_plans]
    assert sum(p.factorized for p in plans) == 8
    gpu = gpu.cpu()
    tol = 1e-3 if method == "whitened" else 1e-4  # relative to the largest weight
    for name, m in ref.named_modules():
        if isinstance(m, LowRankLinear):
            g = gpu.get_submodule(name)
            assert isinstance(g, LowRankLinear) and g.rank == m.rank
            w_ref, w_gpu = m.up.weight @ m.down.weight, g.up.weight @ g.down.weight
            assert (w_gpu - w_ref).abs().max().item() <= tol * w_ref.abs().max().item(), name
            torch.testing.assert_close(g.up.bias, m.up.bias)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x), ref(x), atol=1e-3 if method == "whitened" else 1e-4, rtol=0)


# --- distillation: bf16, fp16 with the grad scaler, resume -----------------------------------------

@pytest.fixture
def autocasts(monkeypatch) -> set:
    """(device type, autocast dtype or None) of every training step the test runs."""
    seen = set()
    real = train_module._autocast

    @contextlib.contextmanager
    def spy(device, amp):
        with real(device, amp):
            on = torch.is_autocast_enabled(device.type)
            seen.add((device.type, torch.get_autocast_dtype(device.type) if on else None))
            yield

    monkeypatch.setattr(train_module, "_autocast", spy)
    return seen


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_distillation_lowers_its_loss_and_resumes_exactly(tmp_path, vit_ckpt, amp, autocasts, deterministic):
    recipe = load_recipe(str(digits_recipe(tmp_path, amp)))
    full_dir, cut = tmp_path / "full", tmp_path / "cut"
    full = compress_checkpoint(vit_ckpt, recipe, out=full_dir, device=DEVICE)
    assert full["train"]["steps"] == STEPS and run_device(full_dir) == DEVICE
    assert autocasts == {("cuda", AMP_DTYPES[amp])} if ON_GPU else {("cpu", None)}  # every step under autocast in the recipe's dtype
    loss = losses(full_dir)
    assert sorted(loss) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in loss.values())
    first, last = statistics.mean(loss[s] for s in range(1, 6)), statistics.mean(loss[s] for s in range(STEPS - 4, STEPS + 1))
    assert last < 0.5 * first, (first, last)
    final_state = load_training_state(full_dir / f"checkpoint-{STEPS:06d}.state.safetensors")
    if ON_GPU and amp == "fp16":
        assert final_state.scaler["scale"] > 0 and "_growth_tracker" in final_state.scaler  # the grad scaler ran and was saved
    else:
        assert final_state.scaler == {}
    assert full["accuracy"]["distilled"]["feature_cosine"] > full["accuracy"]["svd"]["feature_cosine"]

    def interrupt(pos):
        if pos.step == INTERRUPT_AT:  # after the checkpoint at step 15: steps 16-20 are lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(vit_ckpt, recipe, out=cut, device=DEVICE, step_hook=interrupt)
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == [f"checkpoint-{CHECKPOINT_EVERY:06d}{x}.safetensors" for x in ("", ".state")]
    resumed = compress_checkpoint(vit_ckpt, recipe, out=cut, device=DEVICE, resume=True)
    assert resumed["train"]["steps"] == STEPS
    cut_loss = losses(cut)
    assert sorted(cut_loss) == list(range(1, STEPS + 1))  # no step twice
    rel = 1e-6 if not ON_GPU else 1e-3
    assert all(math.isclose(loss[s], cut_loss[s], rel_tol=rel, abs_tol=1e-7) for s in loss), [(s, loss[s], cut_loss[s]) for s in loss]
    assert_same_weights(load(full_dir / "student.safetensors"), load(cut / "student.safetensors"))
    # the grad scaler's state (scale, steps since the last overflow) went on from the checkpoint
    assert load_training_state(cut / f"checkpoint-{STEPS:06d}.state.safetensors").scaler == final_state.scaler
    if not ON_GPU:
        assert resumed["rank_weight_sha256"] == full["rank_weight_sha256"]


# --- torchrun -------------------------------------------------------------------------------------

def _compress(argv_head: list[str], ckpt: Path, recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [*argv_head, "compress", str(ckpt), "--recipe", str(recipe), "--out", str(out), "--device", DEVICE, "--json", *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def test_nproc_1_on_cuda(tmp_path, vit_ckpt):
    """`--nproc 1` is the single-process path (launch.relaunch does not start torchrun for one process)."""
    proc = _compress([sys.executable, "-m", "lowrank_cli"], vit_ckpt, digits_recipe(tmp_path, max_steps=10), tmp_path / "one", "--nproc", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["world_size"] == 1 and report["train"]["steps"] == 10 and run_device(tmp_path / "one") == DEVICE


def test_under_torchrun_with_one_process(tmp_path, vit_ckpt):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "lowrank_cli"]
    proc = _compress(torchrun, vit_ckpt, digits_recipe(tmp_path, max_steps=10), tmp_path / "tr")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["world_size"] == 1 and report["train"]["steps"] == 10 and len(report["rank_weight_sha256"]) == 1


@gpu_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nproc_2_on_two_gpus_ends_with_identical_students(tmp_path, vit_ckpt):
    proc = _compress([sys.executable, "-m", "lowrank_cli"], vit_ckpt, digits_recipe(tmp_path, max_steps=10), tmp_path / "ddp", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["world_size"] == 2 and report["train"]["global_batch"] == 64
    digests = report["rank_weight_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert run_device(tmp_path / "ddp").startswith("cuda")


@gpu_only
def test_more_processes_than_gpus_is_a_one_line_error(tmp_path, vit_ckpt):
    n = torch.cuda.device_count() + 1
    proc = _compress([sys.executable, "-m", "lowrank_cli"], vit_ckpt, digits_recipe(tmp_path, max_steps=10), tmp_path / "many", "--nproc", str(n))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "--nproc" in line and "GPU" in line, line


# --- a student trained on the GPU: export, bench ------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_student(tmp_path_factory) -> Path:
    """The tiny ViT compressed and distilled on the GPU (bf16), 10 steps; its student checkpoint."""
    d = tmp_path_factory.mktemp("gpu-run")
    ckpt = d / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(ckpt))
    report = compress_checkpoint(ckpt, load_recipe(str(digits_recipe(d, max_steps=10))), out=d / "run", device=DEVICE)
    assert report["train"]["steps"] == 10 and run_device(d / "run") == DEVICE
    return d / "run" / "student.safetensors"


def test_export_of_a_gpu_trained_student(cli, gpu_student, tmp_path, fp32_exact):
    onnx_file, dense_file = tmp_path / "student.onnx", tmp_path / "dense.safetensors"
    r = cli("export", gpu_student, "--format", "onnx", "--out", onnx_file, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["verification"]["max_abs_diff"] < 1e-4 and d["factorized_layers"] == 8
    model = load(gpu_student).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        on_device = model.to(DEVICE)(x.to(DEVICE)).cpu()
    got = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, on_device.numpy(), atol=1e-4, rtol=0)  # ONNX on the CPU = the student on the GPU

    r = cli("export", gpu_student, "--format", "dense", "--out", dense_file, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["verification"]["max_abs_diff"] < 1e-5
    assert manifest_of(dense_file) is None
    dense = timm.create_model(TINY_VIT, pretrained=False, checkpoint_path=str(dense_file), **TINY_VIT_KWARGS).eval()  # strict
    with torch.no_grad():
        torch.testing.assert_close(dense.to(DEVICE)(x.to(DEVICE)).cpu(), on_device, atol=1e-4, rtol=0)


@pytest.fixture
def timed_on(monkeypatch) -> list[str]:
    """The device type every `time_interleaved` call of bench and of the per-layer timing was given."""
    seen: list[str] = []
    for module in (bench_module, timing_module):
        real = module.time_interleaved

        def spy(fns, *, real=real, **kw):
            seen.append(torch.device(kw.get("device", "cpu")).type)
            return real(fns, **kw)

        monkeypatch.setattr(module, "time_interleaved", spy)
    return seen


def test_bench_on_cuda(cli, gpu_student, timed_on):
    r = cli("bench", gpu_student, "--device", DEVICE, "--batch", "4", "--repeats", "3", "--layers", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["device"] == DEVICE and d["runtime"] == "torch" and d["batch"] == 4
    assert timed_on == [torch.device(DEVICE).type] * len(timed_on) and len(timed_on) >= 2  # the model, then each layer shape
    assert d["dense"]["median_s"] > 0 and d["factorized"]["median_s"] > 0 and d["dense"]["runs"] == 3
    model = load(gpu_student)
    one = get_family("timm").example_inputs(model)
    assert d["macs_factorized"] == count_macs(model, one).macs < d["macs_dense"]  # MACs counted on the GPU = on the CPU
    assert d["ideal_speedup"] > 1 and d["speedup"] > 0
    assert len(d["layers"]) == 8 and all(t["dense_s"] > 0 and t["factorized_s"] > 0 and t["batch"] == 4 for t in d["layers"])
    if ON_GPU:
        r = cli("bench", gpu_student, "--device", DEVICE, "--threads", "2", "--repeats", "2")
        assert r.code == 0 and "no effect on the CUDA timings" in r.err


@gpu_only
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_bench_onnxruntime_on_cuda_runs_on_the_cuda_provider(cli, gpu_student, monkeypatch):
    providers = []
    real = bench_module.ort_session

    def spy(path, threads, device):
        sess = real(path, threads, device)
        providers.append(sess.get_providers()[0])
        return sess

    monkeypatch.setattr(bench_module, "ort_session", spy)
    r = cli("bench", gpu_student, "--runtime", "onnxruntime", "--device", DEVICE, "--batch", "2", "--repeats", "2", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["runtime"] == "onnxruntime" and d["dense"]["median_s"] > 0 and d["factorized"]["median_s"] > 0
    assert providers == ["CUDAExecutionProvider"] * 2 and d["providers"][0] == "CUDAExecutionProvider"


def test_latency_aware_selection_on_cuda(cli, vit_ckpt, tmp_path, timed_on):
    recipe, out = tmp_path / "lat.yaml", tmp_path / "lat.safetensors"
    recipe.write_text(f"select:\n  exclude: [norm, head, patch_embed]\n  latency_aware: true\n  latency_device: {DEVICE}\n  latency_batch: 2\n")
    r = cli("factorize", vit_ckpt, "--recipe", recipe, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", out, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    lat = d["latency"]
    assert lat["device"] == DEVICE and lat["batch"] == 2 and lat["runtime"] == "torch" and lat["shapes_timed"] == 4
    assert timed_on == [torch.device(DEVICE).type] * 4  # each distinct layer shape timed once, on the GPU
    planned = [layer for layer in d["layers"] if layer["latency"] is not None]
    assert len(planned) == 8 == len(lat["layers"])
    for layer in planned:
        e = lat["layers"][layer["name"]]
        assert e["dense_s"] > 0 and e["factorized_s"] > 0 and e["rows"] == 2 * 17
        assert e["kept_dense"] == (not layer["factorized"]) == (e["speedup"] < 1.1)
    m = manifest_of(out)
    assert m["latency"]["device"] == DEVICE and set(m["layers"]) == {layer["name"] for layer in planned if layer["factorized"]}


# --- the demo ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_demo_on_the_gpu_gives_the_cpu_result(cli, tmp_path, monkeypatch):
    """Seed 0 at the demo's own settings: on the CPU; on the GPU from the same cached teacher (bf16 distillation); and on
    the GPU with the teacher trained there too. Same figures within noise (360 held-out digits: one is 0.28 points)."""
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))

    def demo(device: str, out: str, *extra: str) -> dict:
        r = cli("demo", "--out", tmp_path / out, "--seeds", "1", "--device", device, "--json", *extra)
        assert r.code == 0, r.err
        report = json.loads(r.out)
        assert run_device(tmp_path / out / "seed-0") == device
        return report

    cpu = demo("cpu", "cpu")
    gpu = demo(DEVICE, "gpu")
    retrained = demo(DEVICE, "gpu-teacher", "--retrain-teacher")
    (c,), (g,), (t,) = cpu["seeds"], gpu["seeds"], retrained["seeds"]
    assert cpu["teacher_training"]["cached"] is False and gpu["teacher_training"]["cached"] is True
    assert gpu["teacher_training"]["file"] == cpu["teacher_training"]["file"] and retrained["teacher_training"]["cached"] is False
    assert abs(g["teacher"] - c["teacher"]) <= 3 / 360 and abs(g["svd"] - c["svd"]) <= 3 / 360  # the same teacher and SVD student
    assert abs(g["distilled"] - c["distilled"]) <= 0.03, (c, g)
    assert abs(t["teacher"] - c["teacher"]) <= 0.03 and abs(t["distilled"] - c["distilled"]) <= 0.04, (c, t)
    for row in (c, g, t):
        assert row["teacher"] - row["svd"] >= 0.10 and row["recovered"] >= 0.80, row  # the demo's claim, on either device


# --- issue 18: fused AdamW, the teacher in the training dtype, per-GPU RNG state ---------------------

@gpu_only
def test_adamw_is_fused_on_cuda_and_the_teacher_runs_in_the_amp_dtype():
    from lowrank_cli.distill.objective import DistillationObjective, teacher_dtype
    from lowrank_cli.recipe import DistillConfig

    student, teacher = tiny_vit(1).to(DEVICE).train(), tiny_vit(0).to(DEVICE)
    opt = train_module.create_optimizer(student, DistillConfig(), 1e-3)
    assert opt.defaults["fused"] is True
    objective = DistillationObjective(student, teacher, DistillConfig(), "logits", get_family("timm"), teacher_dtype(torch.device(DEVICE), "bf16"))
    assert {p.dtype for p in objective.teacher.parameters()} == {torch.bfloat16} and next(teacher.parameters()).dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = objective(student, torch.randn(4, 3, 32, 32, device=DEVICE), torch.arange(4, device=DEVICE))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in student.parameters())
    state = train_module.rng_state(torch.device(DEVICE))
    assert len(state["cuda"]) == 1
    objective.close()


# --- the device given is the device used (issue 36): calibration and sensitivity passes -----------

@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_calibration_passes_of_a_host_model_run_on_the_device_and_the_model_returns(allocation, fp32_exact):
    """A model on the host, `device` the GPU: the statistics and sensitivity passes see the GPU, the factors end on the host,
    and the factorized model is the one the CPU gives (to fp32 tolerance)."""
    recipe = recipe_from_dict({"select": {"exclude": ["norm", "head", "patch_embed"]},
                               "factorize": {"method": "whitened", "kappa": 2, "allocation": allocation}})
    family = get_family("timm")
    model = tiny_vit()
    calib = calibration("synthetic", model, 32, 16)
    ref = copy.deepcopy(model)
    factorize_model(ref, recipe, family=family, calibration=calib, device="cpu")
    seen = set()
    hook = model.blocks[0].mlp.fc1.register_forward_pre_hook(lambda _m, args: seen.add(args[0].device.type))
    factorize_model(model, recipe, family=family, calibration=calib, device=DEVICE)
    hook.remove()
    assert seen == {torch.device(DEVICE).type}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=2e-3, rtol=0)


def test_compress_one_block_at_a_time_on_the_gpu_gives_the_cpu_result(tmp_path, fp32_exact):
    """`compress` under a small factorize.max_memory on `DEVICE`: every pass (measure, factorization, local stage, held-out
    chains, the head) on the GPU, activations spilled to disk and read back onto it; the perplexities and the student are
    the CPU run's within GPU float tolerance."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from factorize.test_blockwise import _recipe  # the tiny Llama's recipe: 400KB, sensitivity, whitened, 5 local steps
    from hf_models import hub_model

    from lowrank_cli.io.manifest import read_checkpoint
    from lowrank_cli.pipelines.compress import compress_checkpoint

    folder = hub_model(tmp_path, "llama-tied", pretrain_steps=30)
    cpu = compress_checkpoint(folder, _recipe(), device="cpu", out=tmp_path / "cpu")
    gpu = compress_checkpoint(folder, _recipe(), device=DEVICE, out=tmp_path / "gpu")
    assert gpu["streamed"]["activations_peak_disk"] > 0
    for model in ("teacher", "svd", "distilled"):
        assert gpu["accuracy"][model]["perplexity"] == pytest.approx(cpu["accuracy"][model]["perplexity"], rel=1e-3)
    a, b = read_checkpoint(tmp_path / "cpu")[2], read_checkpoint(tmp_path / "gpu")[2]
    assert a.keys() == b.keys() and all(t.device.type == "cpu" for t in b.values())
