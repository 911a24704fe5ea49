"""`lowrank bench` and `time_linear_layers`: structure and MAC arithmetic, never wall-clock thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS, macs_of, one_line_error, tiny_vit
from safetensors.torch import save_file

from lowrank_cli.measure import LayerShape, Timing, layer_shapes, time_interleaved, time_linear_layers
from lowrank_cli.models import load
from lowrank_cli.pipelines.bench import bench_checkpoint
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe

TIMING_KEYS = {"median_s", "min_s", "max_s", "iqr_s", "runs"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher, factorized) tiny ViT checkpoints, made once for the module."""
    d = tmp_path_factory.mktemp("bench")
    teacher = d / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(teacher))
    return teacher, factorize_checkpoint(teacher, load_recipe("deit"), d / "vit.k2.safetensors", TINY_VIT, TINY_VIT_KWARGS).out


def _check_timing(t: dict, runs: int) -> None:
    assert set(t) == TIMING_KEYS and t["runs"] == runs
    assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"] and t["iqr_s"] >= 0


def test_bench_json_structure_and_ideal_is_mac_ratio(cli, ckpts):
    teacher, fact = ckpts
    r = cli("bench", fact, "--batch", "2", "--threads", "1", "--repeats", "3", "--warmup", "1", "--layers", "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert (d["runtime"], d["device"], d["batch"], d["threads"]) == ("torch", "cpu", 2, 1)
    _check_timing(d["factorized"], 3)
    _check_timing(d["dense"], 3)
    model = load(fact)
    assert d["macs_factorized"] == macs_of(model).macs == 1093760
    assert d["macs_dense"] == macs_of(load(teacher, TINY_VIT, **TINY_VIT_KWARGS)).macs == 1942400
    assert d["ideal_speedup"] == pytest.approx(d["macs_dense"] / d["macs_factorized"])
    assert d["speedup"] == pytest.approx(d["dense"]["median_s"] / d["factorized"]["median_s"])
    assert d["efficiency"] == pytest.approx(d["speedup"] / d["ideal_speedup"])
    assert d["params_factorized"] == 64330 and d["params_dense"] == 114250
    layers = {l["name"]: l for l in d["layers"]}
    assert len(layers) == 8
    fc1 = layers["blocks.0.mlp.fc1"]
    # 4x4 patches + the class token = 17 tokens per image; rank floor(64·256 / (2·320)) = 25
    assert (fc1["d_in"], fc1["d_out"], fc1["rank"], fc1["tokens"], fc1["batch"]) == (64, 256, 25, 17, 2)
    assert fc1["ideal_speedup"] == pytest.approx(64 * 256 / (25 * 320))
    assert fc1["speedup"] == pytest.approx(fc1["dense_s"] / fc1["factorized_s"])
    assert fc1["slower"] == (fc1["factorized_s"] > fc1["dense_s"])


def test_bench_against_teacher_baseline_table(cli, ckpts):
    teacher, fact = ckpts
    r = cli("bench", fact, "--baseline", teacher, "--batch", "1", "--threads", "1", "--repeats", "2", "--warmup", "0")
    assert r.code == 0, r.err
    assert "dense: " + str(teacher) in r.out.replace("\n", "") or str(teacher.name) in r.out
    assert "1.78× ideal" in r.out.replace("\n", " ")  # 1942400 / 1093760 MACs


def test_bench_refuses_a_factorized_baseline(cli, ckpts):
    _, fact = ckpts
    one_line_error(cli("bench", fact, "--baseline", fact, "--batch", "1", "--repeats", "1", "--warmup", "0"),
                    "--baseline", "is a factorized checkpoint", "give the dense original")


def test_bench_onnxruntime(ckpts):
    _, fact = ckpts
    res = bench_checkpoint(fact, batch=2, threads=1, runtime="onnxruntime", repeats=2, warmup=1)
    d = res.to_dict()
    assert d["runtime"] == "onnxruntime" and d["layers"] is None and d["providers"] == ["CPUExecutionProvider"] and d["device"] == "cpu"
    _check_timing(d["factorized"], 2)
    assert d["ideal_speedup"] == pytest.approx(1942400 / 1093760)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_time_linear_layers_from_shapes_before_factorizing(runtime):
    # what a latency-aware selection asks before any checkpoint exists: shapes and planned ranks only
    shapes = [LayerShape("a", 96, 384, 38, tokens=50), LayerShape("b", 96, 384, 38, tokens=50), LayerShape("c", 384, 96, 38, tokens=50, bias=False)]
    out = time_linear_layers(shapes, batch=2, runtime=runtime, threads=1, repeats=3, min_sample_s=0.0)
    assert [t.name for t in out] == ["a", "b", "c"]
    assert out[0].dense_s == out[1].dense_s  # same shape and tokens: timed once
    for t, s in zip(out, shapes):
        assert (t.d_in, t.d_out, t.rank, t.tokens, t.batch) == (s.d_in, s.d_out, s.rank, 50, 2)
        assert t.ideal_speedup == pytest.approx(s.d_in * s.d_out / (s.rank * (s.d_in + s.d_out)))
        assert t.dense_s > 0 and t.factorized_s > 0 and t.slower == (t.factorized_s > t.dense_s)
    # a token override applies to every layer
    assert {t.tokens for t in time_linear_layers(shapes[:1], tokens=7, repeats=1, warmup=0)} == {7}


def test_layer_shapes_of_factorized_model_use_real_token_counts(ckpts):
    _, fact = ckpts
    model = load(fact)
    shapes = layer_shapes(model, macs_of(model).linear_rows)
    assert len(shapes) == 8 and {s.tokens for s in shapes} == {17}
    assert shapes[0] == LayerShape("blocks.0.attn.qkv", 64, 192, 24, 17, True)


def test_time_interleaved_alternates_and_counts():
    calls = []
    t = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=4)
    assert calls == ["a", "b"] + ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, calibration, alternating rounds
    assert isinstance(t["a"], Timing) and t["a"].runs == t["b"].runs == 4


def test_bench_bad_inputs_one_line_errors(cli, ckpts, tmp_path):
    teacher, fact = ckpts
    one_line_error(cli("bench", tmp_path / "nope.safetensors"), "nope.safetensors", "no such file")
    one_line_error(cli("bench", teacher), str(teacher), "not a factorized checkpoint")
    one_line_error(cli("bench", fact, "--runtime", "tvm"), "'--runtime': 'tvm' is not one of 'torch', 'onnxruntime'", code=2)
    one_line_error(cli("bench", fact, "--batch", "0"), "'--batch'", "greater than or equal to 1", code=2)
    one_line_error(cli("bench", fact, "--threads", "0"), "'--threads'", code=2)
    if not torch.cuda.is_available():
        one_line_error(cli("bench", fact, "--device", "cuda"), "CUDA is not available")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def gpu_without_ort_gpu(monkeypatch):
    """A CUDA machine (mocked) whose onnxruntime is the CPU-only package."""
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])


def test_onnxruntime_on_cuda_without_onnxruntime_gpu_is_refused(cli, ckpts, gpu_without_ort_gpu):
    _, fact = ckpts
    for device in ("cuda", "cuda:1"):
        one_line_error(cli("bench", fact, "--runtime", "onnxruntime", "--device", device),
                       f"--device '{device}' with runtime onnxruntime needs the onnxruntime-gpu package",
                       "AzureExecutionProvider, CPUExecutionProvider only", "use runtime torch or device cpu")
    shapes = [LayerShape("a", 96, 384, 38, tokens=5)]
    with pytest.raises(Exception, match="needs the onnxruntime-gpu package"):
        time_linear_layers(shapes, device="cuda", runtime="onnxruntime")
    from lowrank_cli.plan import LatencySelection
    from lowrank_cli.recipe import SelectConfig

    with pytest.raises(Exception, match="^select.latency_device 'cuda' with runtime onnxruntime needs the onnxruntime-gpu package"):
        LatencySelection(SelectConfig(latency_aware=True, latency_runtime="onnxruntime"), {})


def test_onnxruntime_on_auto_without_onnxruntime_gpu_runs_on_the_cpu_and_says_so(ckpts, gpu_without_ort_gpu, monkeypatch):
    import lowrank_cli.pipelines.bench as bench

    monkeypatch.setattr(bench, "_onnx_runner", lambda family, model, tmp, name, threads, device, x: pytest.fail(f"ran on {device}")
                        if device.type != "cpu" else _fake_runner())
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self if not a or str(a[0]) == "cpu" else pytest.fail(f"moved to {a}"))
    d = bench_checkpoint(ckpts[1], batch=1, runtime="onnxruntime", repeats=1, warmup=0).to_dict()
    assert d["device"] == "cpu" and d["providers"] == ["CPUExecutionProvider"]
    assert any("onnxruntime-gpu is not installed" in n for n in d["notes"])


def _fake_runner():
    run = lambda: None  # noqa: E731
    run.providers = ["CPUExecutionProvider"]
    return run
