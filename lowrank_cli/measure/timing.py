"""Timing primitives: interleaved timing of several callables, and dense vs factorized linear layers.

`time_interleaved` times callables in the same process, interleaved (their order alternates
every repeat, so drift and other load hit both alike), after warm-up; CUDA is timed with
events after a synchronisation.

`time_linear_layers` times a dense `nn.Linear(d_in, d_out)` against a `LowRankLinear` of
rank r at a given number of rows, from shapes alone (random weights: time does not depend on
values), so a selection step can ask "is this layer faster factorized?" before factorizing.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from lowrank_cli.device import resolve_device
from lowrank_cli.errors import LowrankError
from lowrank_cli.nn.lowrank import LowRankLinear, inference_layout

RUNTIMES = ("torch", "onnxruntime")


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise LowrankError(f"runtime '{runtime}' is not supported; accepted: {', '.join(RUNTIMES)}", param="runtime")


@dataclass
class Timing:
    """Seconds per call: median and spread of `runs` interleaved measurements."""

    median_s: float
    min_s: float
    max_s: float
    iqr_s: float  # interquartile range: the spread that ignores one-off stalls
    runs: int

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
        return cls(statistics.median(samples), min(samples), max(samples), q[2] - q[0], len(samples))


@dataclass(frozen=True)
class LayerShape:
    """A linear layer to time: `d_in → d_out`, factorized at `rank`, applied to `tokens` rows per image."""

    name: str
    d_in: int
    d_out: int
    rank: int
    tokens: int
    bias: bool = True

    @property
    def ideal_speedup(self) -> float:
        """MAC ratio of the dense layer to its factorization: d_in·d_out / (r·(d_in + d_out))."""
        return self.d_in * self.d_out / (self.rank * (self.d_in + self.d_out))


@dataclass
class LayerTiming:
    """Dense vs factorized seconds per call of one layer, at `batch · tokens` rows."""

    name: str
    d_in: int
    d_out: int
    rank: int
    tokens: int
    batch: int
    dense_s: float
    factorized_s: float
    speedup: float
    ideal_speedup: float
    slower: bool  # the factorized layer is slower than the dense one it replaces

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- timing primitives ------------------------------------------------------------------------

def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """A function timing one call in seconds: CUDA events after a synchronisation on the GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        def cuda_time(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        return cuda_time

    def cpu_time(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return cpu_time


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    repeats: int = 10,
    device: torch.device = torch.device("cpu"),
    min_sample_s: float = 0.0,
) -> dict[str, Timing]:
    """Time each function `repeats` times, interleaved with the others, order alternating each round.

    A function faster than `min_sample_s` is called several times per sample (the mean is
    taken), so that timer resolution and call overhead do not dominate small layers.
    """
    timer = _timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    inner = {}
    for key, fn in fns.items():
        once = max(timer(fn), 1e-7)
        inner[key] = max(1, int(min_sample_s / once)) if min_sample_s else 1
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(repeats):
        for key in keys if i % 2 == 0 else reversed(keys):
            fn, n = fns[key], inner[key]
            samples[key].append(timer(lambda: [fn() for _ in range(n)]) / n)
    return {k: Timing.of(v) for k, v in samples.items()}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op threads for the block; yields the number in use."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise LowrankError(f"threads {threads}: must be at least 1", param="threads")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# --- per-layer timing -------------------------------------------------------------------------

def layer_shapes(model: nn.Module, rows: dict[str, int]) -> list[LayerShape]:
    """The shape, rank and per-example token count of every `LowRankLinear` of a factorized model.

    `rows`: each linear's input rows for one example (`count_macs(model, inputs).linear_rows` at batch 1).
    """
    return [
        LayerShape(name, m.in_features, m.out_features, m.rank, rows.get(f"{name}.down", 1), m.up.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    ]


def _layer_pair_torch(shape: LayerShape, batch: int, device: torch.device, dtype: torch.dtype):
    dense = nn.Linear(shape.d_in, shape.d_out, bias=shape.bias, device=device, dtype=dtype).eval()
    low = LowRankLinear(shape.d_in, shape.d_out, shape.rank, bias=shape.bias, device=device, dtype=dtype).eval()
    inference_layout(low)  # as `lowrank_cli.load` and `bench` run it
    x = torch.randn(batch, shape.tokens, shape.d_in, device=device, dtype=dtype)

    def run(m):
        def call():
            with torch.inference_mode():
                return m(x)
        return call
    return run(dense), run(low)


def _onnx_linear(d_in: int, rank_dims: list[int], bias: bool, path: Path) -> None:
    """A graph `X → MatMul(W₁ᵀ) → … → (+ b)`, as the exporter writes a linear on a 3-D input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev, width = [], [], "X", d_in
    for i, d in enumerate(rank_dims):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, d)) / width**0.5).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"H{i}"]))
        prev, width = f"H{i}", d
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "B"))
        nodes.append(helper.make_node("Add", [prev, "B"], ["Y"]))
    else:
        nodes.append(helper.make_node("Identity", [prev], ["Y"]))
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "tokens", d_in])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "tokens", width])], inits,
    )
    # IR version 10: what onnxruntime ≥ 1.17 reads (onnx's newest default can be ahead of it)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))


CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def ort_cuda_available() -> bool:
    """Whether this onnxruntime can run on a GPU (the `onnxruntime-gpu` package: CUDAExecutionProvider)."""
    import onnxruntime as ort

    return CUDA_EP in ort.get_available_providers()


def check_ort_device(device: torch.device, param: str = "device") -> None:
    """A LowrankError (about `param`) when onnxruntime is asked for CUDA without `onnxruntime-gpu` (it would run on the CPU)."""
    if device.type != "cuda" or ort_cuda_available():
        return
    import onnxruntime as ort

    raise LowrankError(f"{param} '{device}' with runtime onnxruntime needs the onnxruntime-gpu package: this onnxruntime has "
                       f"{', '.join(ort.get_available_providers())} only, so it would run on the CPU; install onnxruntime-gpu, "
                       "or use runtime torch or device cpu", param=param)


def ort_session(path: Path, threads: int | None, device: torch.device):
    """An onnxruntime session with every graph optimisation, sequential execution, `threads` intra-op threads.

    On CUDA it runs on `device`'s GPU (CUDAExecutionProvider), or is a LowrankError: never a
    silent fall-back to the CPU. `session.get_providers()` says what it uses.
    """
    import onnxruntime as ort

    check_ort_device(device)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = threads
    providers: list = [CPU_EP]
    if device.type == "cuda":
        providers.insert(0, (CUDA_EP, {"device_id": device.index or 0}))
    sess = ort.InferenceSession(str(path), so, providers=providers)
    if device.type == "cuda" and CUDA_EP not in sess.get_providers():  # the provider is there but failed to load (CUDA/cuDNN libraries)
        raise LowrankError(f"device '{device}' with runtime onnxruntime: CUDAExecutionProvider failed to load (the session has "
                           f"{', '.join(sess.get_providers())}); check that onnxruntime-gpu matches this CUDA and cuDNN, or use runtime torch",
                           param="device")
    return sess


def _layer_pair_ort(shape: LayerShape, batch: int, threads: int | None, device: torch.device, tmp: Path):
    x = np.random.default_rng(0).standard_normal((batch, shape.tokens, shape.d_in)).astype(np.float32)
    calls = []
    for tag, dims in (("dense", [shape.d_out]), ("lowrank", [shape.rank, shape.d_out])):
        path = tmp / f"{tag}_{shape.d_in}_{shape.d_out}_{shape.rank}.onnx"
        _onnx_linear(shape.d_in, dims, shape.bias, path)
        sess = ort_session(path, threads, device)
        calls.append(lambda sess=sess: sess.run(None, {"X": x}))
    return calls[0], calls[1]


def time_linear_layers(
    layers: Iterable[LayerShape],
    batch: int = 1,
    *,
    tokens: int | None = None,
    device: str | torch.device | None = "cpu",
    runtime: str = "torch",
    threads: int | None = None,
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    repeats: int = 7,
    min_sample_s: float = 0.005,
) -> list[LayerTiming]:
    """Dense `nn.Linear` vs `LowRankLinear` time of each layer at `batch × tokens` rows.

    `layers`: the shapes to time (`layer_shapes` of a factorized model, or the planned ranks of a
    model not yet factorized). `tokens` overrides
    every layer's token count. Layers of the same shape and token count are timed once.
    Weights are random: only shapes matter for time.
    """
    check_runtime(runtime)
    dev = resolve_device(device)
    if runtime == "onnxruntime":
        check_ort_device(dev)
    shapes = list(layers)
    if tokens is not None:
        shapes = [LayerShape(s.name, s.d_in, s.d_out, s.rank, tokens, s.bias) for s in shapes]
    measured: dict[tuple, tuple[float, float]] = {}
    out = []
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="lowrank-layers-") as tmp:
        for s in shapes:
            key = (s.d_in, s.d_out, s.rank, s.tokens, s.bias)
            if key not in measured:
                if runtime == "torch":
                    dense, low = _layer_pair_torch(s, batch, dev, dtype)
                else:
                    dense, low = _layer_pair_ort(s, batch, threads, dev, Path(tmp))
                t = time_interleaved({"dense": dense, "low": low}, warmup=warmup, repeats=repeats, device=dev, min_sample_s=min_sample_s)
                measured[key] = (t["dense"].median_s, t["low"].median_s)
            d, f = measured[key]
            out.append(LayerTiming(s.name, s.d_in, s.d_out, s.rank, s.tokens, batch, d, f, d / f, s.ideal_speedup, f > d))
    return out
