"""Factorized vs dense latency on the GPU: eager PyTorch, torch.compile and onnxruntime, each against the ideal (MAC ratio).

For each model (random weights: time does not depend on values), factorized by its recipe
(`deit` κ = 2 for DeiT, `swin` for Swin, or `--kappa`), and each batch size: the dense model
and the factorized one are timed in the same process, interleaved, after warm-up
(`measure.time_interleaved`; CUDA events), in each mode:

- `eager`: the models cast to `--dtype`, under `torch.inference_mode`;
- `compile`: the same, through `torch.compile(mode=--compile-mode, dynamic=False)` (compiled in the warm-up);
- `onnxruntime`: the fp32 graphs the library exports (`export.onnx.onnx_export_model`, timm's
  exportable layers, as `lowrank bench --runtime onnxruntime` builds them), in a session from
  `measure.timing.ort_session` (CUDA execution provider when installed: `onnxruntime-gpu`), or
  TensorRT's provider (`--ort-provider tensorrt`, fp16 kernels allowed unless `--dtype fp32`).
  On the GPU, inputs and outputs stay on the device (I/O binding). The provider that ran is printed.

The ideal speedup is the MAC ratio (`measure.count_macs`); efficiency = measured / ideal. Rows
where the factorized model is slower than the dense one are listed at the end: where
factorization does not pay (typically small batches, which are launch-bound on a GPU).

    python tests/benchmarks/bench_gpu_latency.py --device cuda                 # deit_base + swin_base, batch 1 64 256, bf16, all modes
    python tests/benchmarks/bench_gpu_latency.py --models deit_tiny_patch16_224 --batches 1 4 --dtype fp32 --modes eager onnxruntime --device cpu
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lowrank_cli.device import resolve_device
from lowrank_cli.export.onnx import onnx_export_model
from lowrank_cli.factorize import factorize_model
from lowrank_cli.measure import count_macs, time_interleaved
from lowrank_cli.measure.timing import ort_session
from lowrank_cli.models import create_model, get_family
from lowrank_cli.recipe import Recipe, load_recipe

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Runner = Callable[[], Any]


def recipe_for(model: str, kappa: float | None) -> Recipe:
    return load_recipe("swin" if "swin" in model else "deit").with_kappa(kappa)


def build_pair(model: str, recipe: Recipe) -> tuple[nn.Module, nn.Module]:
    """(dense, factorized) on the CPU in fp32, eval mode, the same weights; in timm's exportable form under `exportable()`."""
    torch.manual_seed(0)
    dense = create_model(model).eval()
    fact = copy.deepcopy(dense)
    factorize_model(fact, recipe, family=get_family("timm"))
    return dense, fact.eval()


def torch_runner(model: nn.Module, x: torch.Tensor) -> Runner:
    def run():
        with torch.inference_mode():
            return model(x)
    return run


def session(path: Path, device: torch.device, provider: str, dtype: str):
    """The library's session (CUDA EP on a GPU when installed), or one on TensorRT's provider."""
    if provider != "tensorrt":
        return ort_session(path, None, device if provider != "cpu" else torch.device("cpu"))
    import onnxruntime as ort

    trt = ("TensorrtExecutionProvider", {"device_id": device.index or 0, "trt_fp16_enable": dtype != "fp32"})
    return ort.InferenceSession(str(path), providers=[trt, "CUDAExecutionProvider", "CPUExecutionProvider"])


def ort_runner(sess, x: torch.Tensor) -> Runner:
    """One call of `sess` on `x`: through I/O binding when the session runs on the GPU, else from host memory."""
    name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    if sess.get_providers()[0] == "CPUExecutionProvider":
        feed = {name: x.cpu().numpy()}
        return lambda: sess.run(None, feed)
    x = x.float().contiguous()
    binding = sess.io_binding()
    binding.bind_input(name=name, device_type="cuda", device_id=x.device.index or 0, element_type=np.float32, shape=tuple(x.shape),
                       buffer_ptr=x.data_ptr())
    binding.bind_output(out, "cuda", x.device.index or 0)
    return lambda: sess.run_with_iobinding(binding)


def time_torch(dense: nn.Module, fact: nn.Module, batch: int, device: torch.device, dtype: torch.dtype, compile_mode: str | None,
               warmup: int, repeats: int) -> tuple[float, float]:
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    models = {"dense": dense, "factorized": fact}
    if compile_mode is not None:
        models = {k: torch.compile(m, mode=compile_mode, dynamic=False) for k, m in models.items()}
    t = time_interleaved({k: torch_runner(m, x) for k, m in models.items()}, warmup=warmup, repeats=repeats, device=device)
    return t["dense"].median_s, t["factorized"].median_s


def time_onnxruntime(paths: dict[str, Path], batch: int, device: torch.device, provider: str, dtype: str,
                     warmup: int, repeats: int) -> tuple[float, float, str]:
    sessions = {k: session(p, device, provider, dtype) for k, p in paths.items()}
    x = torch.randn(batch, 3, 224, 224, device=device)
    runners = {k: ort_runner(s, x) for k, s in sessions.items()}
    t = time_interleaved(runners, warmup=warmup, repeats=repeats, device=torch.device("cpu"))  # a run returns when its outputs are ready
    return t["dense"].median_s, t["factorized"].median_s, sessions["dense"].get_providers()[0]


def export_pair(model: str, recipe: Recipe, tmp: Path) -> dict[str, Path]:
    """The dense and factorized models exported to ONNX as the library does for onnxruntime (timm's exportable layers)."""
    family = get_family("timm")
    with family.exportable():
        dense, fact = build_pair(model, recipe)
    paths = {}
    for name, m in (("dense", dense), ("factorized", fact)):
        paths[name] = tmp / f"{model}.{name}.onnx"
        onnx_export_model(m, paths[name], family.example_inputs(m, 2), forward=family.forward)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["deit_base_patch16_224", "swin_base_patch4_window7_224"])
    ap.add_argument("--kappa", type=float, default=None, help="default: the recipe's (deit 2, swin 1.5)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="eager and compile (onnxruntime runs the fp32 graph)")
    ap.add_argument("--modes", nargs="+", default=["eager", "compile", "onnxruntime"], choices=["eager", "compile", "onnxruntime"])
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--ort-provider", default="auto", choices=["auto", "cpu", "tensorrt"], help="auto: CUDA's on a GPU when installed")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({where}); median of {args.repeats} interleaved runs after {args.warmup}", flush=True)

    rows, slower = [], []
    with tempfile.TemporaryDirectory(prefix="lowrank-gpu-latency-") as tmp:
        for model in args.models:
            recipe = recipe_for(model, args.kappa)
            dense, fact = build_pair(model, recipe)
            one = torch.randn(1, 3, 224, 224)
            ideal = count_macs(dense, one).macs / count_macs(fact, one).macs
            print(f"{model}: recipe {recipe.name} κ={recipe.factorize.kappa:g}, ideal speedup {ideal:.2f}×", flush=True)
            dense, fact = dense.to(device, dtype), fact.to(device, dtype)
            paths = export_pair(model, recipe, Path(tmp)) if "onnxruntime" in args.modes else {}
            for batch in args.batches:
                for mode in args.modes:
                    if mode == "onnxruntime":
                        d, f, provider = time_onnxruntime(paths, batch, device, args.ort_provider, args.dtype, args.warmup, args.repeats)
                        label = f"fp32 graph, {provider.removesuffix('ExecutionProvider')}"
                    else:
                        compile_mode = args.compile_mode if mode == "compile" else None
                        d, f = time_torch(dense, fact, batch, device, dtype, compile_mode, args.warmup, args.repeats)
                        label = args.dtype
                    speedup = d / f
                    rows.append(f"| {model} | {mode} | {label} | {batch} | {d * 1e3:.2f} | {f * 1e3:.2f} | {speedup:.2f} | {ideal:.2f} | {speedup / ideal:.0%} |")
                    if speedup < 1:
                        slower.append(f"{model} {mode} batch {batch}: {speedup:.2f}×")
                    print(rows[-1], flush=True)
            del dense, fact
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    print("| model | mode | dtype | batch | dense ms | factorized ms | speedup | ideal | efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print("\nfactorization does not pay (factorized slower than dense): " + ("; ".join(slower) if slower else "nowhere measured"))


if __name__ == "__main__":
    main()
