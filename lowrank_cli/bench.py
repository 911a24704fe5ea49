"""Latency of a factorized model against its dense baseline, and of each factorized layer.

The baseline and the factorized model are timed in the same process, interleaved (their
order alternates every repeat, so drift and other load hit both alike), after warm-up.
The ideal speedup is the MAC ratio; efficiency = measured / ideal.

`time_linear_layers` times a dense `nn.Linear(d_in, d_out)` against a `LowRankLinear` of
rank r at a given number of rows, from shapes alone (random weights: time does not depend on
values), so a selection step can ask "is this layer faster factorized?" before factorizing.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize import LowRankLinear

RUNTIMES = ("torch", "onnxruntime")


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


@dataclass
class BenchResult:
    """What `lowrank bench` measured. MACs per image; times in seconds per batch."""

    model: str
    baseline: str
    runtime: str
    device: str
    batch: int
    threads: int
    factorized: Timing
    dense: Timing
    macs_factorized: int
    macs_dense: int
    params_factorized: int
    params_dense: int
    layers: list[LayerTiming] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense.median_s / self.factorized.median_s

    @property
    def ideal_speedup(self) -> float:
        return self.macs_dense / self.macs_factorized

    @property
    def efficiency(self) -> float:
        return self.speedup / self.ideal_speedup

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(speedup=self.speedup, ideal_speedup=self.ideal_speedup, efficiency=self.efficiency)
        d["layers"] = None if self.layers is None else [t.to_dict() for t in self.layers]
        return d


# --- timing primitives ------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None) -> torch.device:
    """`cuda` when available and not told otherwise, else `cpu`; an unavailable CUDA is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowrankError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise LowrankError(f"--device {device}: not supported; use cpu or cuda")
    return dev


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
            raise LowrankError(f"--threads {threads}: must be at least 1")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# --- per-layer timing -------------------------------------------------------------------------

def layer_shapes(model: nn.Module, batch: int = 1) -> list[LayerShape]:
    """The shape, rank and per-image token count of every `LowRankLinear` of a factorized model."""
    from lowrank_cli.flops import count_macs

    rows = count_macs(model, batch=1).linear_rows
    return [
        LayerShape(name, m.in_features, m.out_features, m.rank, rows.get(f"{name}.down", 1), m.up.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    ]


def _layer_pair_torch(shape: LayerShape, batch: int, device: torch.device, dtype: torch.dtype):
    dense = nn.Linear(shape.d_in, shape.d_out, bias=shape.bias, device=device, dtype=dtype).eval()
    low = LowRankLinear(shape.d_in, shape.d_out, shape.rank, bias=shape.bias, device=device, dtype=dtype).eval()
    x = torch.randn(batch, shape.tokens, shape.d_in, device=device, dtype=dtype)

    def run(m):
        def call():
            with torch.inference_mode():
                return m(x)
        return call
    return run(dense), run(low)


def _onnx_linear(d_in: int, rank_dims: list[int], bias: bool, path: Path) -> None:
    """A graph `X → MatMul(W₁ᵀ) → … → (+ b)`, as the exporter writes a linear on a 3-D input."""
    import numpy as np
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


def ort_session(path: Path, threads: int | None, device: torch.device):
    """An onnxruntime session with every graph optimisation, sequential execution, `threads` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), so, providers=providers)


def _layer_pair_ort(shape: LayerShape, batch: int, threads: int | None, device: torch.device, tmp: Path):
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, shape.tokens, shape.d_in)).astype(np.float32)
    calls = []
    for tag, dims in (("dense", [shape.d_out]), ("lowrank", [shape.rank, shape.d_out])):
        path = tmp / f"{tag}_{shape.d_in}_{shape.d_out}_{shape.rank}.onnx"
        _onnx_linear(shape.d_in, dims, shape.bias, path)
        sess = ort_session(path, threads, device)
        calls.append(lambda sess=sess: sess.run(None, {"X": x}))
    return calls[0], calls[1]


def time_linear_layers(
    layers: nn.Module | Iterable[LayerShape],
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

    `layers` is a factorized model (its `LowRankLinear`s and their real token counts) or
    `LayerShape`s (e.g. planned ranks of a model not yet factorized). `tokens` overrides
    every layer's token count. Layers of the same shape and token count are timed once.
    Weights are random: only shapes matter for time.
    """
    if runtime not in RUNTIMES:
        raise LowrankError(f"--runtime '{runtime}' is not supported; use one of {', '.join(RUNTIMES)}")
    dev = resolve_device(device)
    shapes = layer_shapes(layers) if isinstance(layers, nn.Module) else list(layers)
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


# --- whole-model benchmark --------------------------------------------------------------------

def _onnx_runner(model: nn.Module, tmp: Path, name: str, input_size, threads: int | None, device: torch.device, x: torch.Tensor):
    from lowrank_cli.export import onnx_export_model

    path = tmp / f"{name}.onnx"
    onnx_export_model(model, path, input_size)
    sess = ort_session(path, threads, device)
    feed = {sess.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: sess.run(None, feed)


def bench_checkpoint(
    model: str | os.PathLike | None,
    baseline: str | os.PathLike | None = None,
    *,
    batch: int = 8,
    threads: int | None = None,
    runtime: str = "torch",
    device: str | torch.device | None = None,
    layers: bool = False,
    warmup: int = 2,
    repeats: int = 10,
    runs_dir: str | os.PathLike | None = None,
) -> BenchResult:
    """Latency of a factorized checkpoint vs its dense baseline in the same process, interleaved.

    The baseline is `baseline` (e.g. the teacher checkpoint, built with the factorized
    model's architecture) or, without one, the same model with every `LowRankLinear`
    merged back to a dense `nn.Linear`.
    """
    import timm.layers

    from lowrank_cli.export import RUNS_DIR, merge_model, require_manifest, resolve_model_path
    from lowrank_cli.flops import count_macs, count_params, model_input_size
    from lowrank_cli.models import build_model

    if runtime not in RUNTIMES:
        raise LowrankError(f"--runtime '{runtime}' is not supported; use one of {', '.join(RUNTIMES)}")
    if batch < 1:
        raise LowrankError(f"--batch {batch}: must be at least 1")
    if repeats < 1 or warmup < 0:
        raise LowrankError(f"--repeats {repeats} / --warmup {warmup}: need at least 1 repeat and no negative warm-up")
    dev = resolve_device(device)
    path = resolve_model_path(model, runs_dir or RUNS_DIR)
    _, manifest = require_manifest(path, "bench", need_architecture=True)
    with timm.layers.set_exportable(runtime == "onnxruntime"):  # the ONNX path wants export-friendly modules
        fact, _ = build_model(path)
        if baseline is not None:
            dense, base_header = build_model(Path(baseline), manifest["architecture"], manifest.get("model_kwargs", {}))
            if base_header is not None and base_header.manifest is not None:  # timing low rank against low rank says nothing
                raise LowrankError(f"--baseline {baseline}: is a factorized checkpoint; give the dense original, or omit --baseline to time MODEL merged dense")
        else:
            dense = merge_model(copy.deepcopy(fact))
    fact, dense = fact.float().eval().to(dev), dense.float().eval().to(dev)
    input_size = model_input_size(fact)
    macs_f, macs_d = count_macs(fact).macs, count_macs(dense).macs
    x = torch.randn(batch, *input_size, device=dev)
    notes = []
    with torch_threads(threads) as n_threads:
        if runtime == "torch":
            def call(m):
                def run():
                    with torch.inference_mode():
                        return m(x)
                return run
            runners = {"dense": call(dense), "factorized": call(fact)}
            timings = time_interleaved(runners, warmup=warmup, repeats=repeats, device=dev)
        else:
            with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp:
                runners = {
                    "dense": _onnx_runner(dense, Path(tmp), "dense", input_size, threads, dev, x),
                    "factorized": _onnx_runner(fact, Path(tmp), "factorized", input_size, threads, dev, x),
                }
                timings = time_interleaved(runners, warmup=warmup, repeats=repeats, device=torch.device("cpu"))
        layer_times = time_linear_layers(fact, batch, device=dev, runtime=runtime, threads=threads) if layers else None
    if dev.type == "cpu" and os.cpu_count() and n_threads > os.cpu_count():
        notes.append(f"{n_threads} threads on {os.cpu_count()} CPU cores: oversubscribed")
    return BenchResult(
        str(path), str(baseline) if baseline else "merged dense (W = up·down)", runtime, str(dev), batch, n_threads,
        timings["factorized"], timings["dense"], macs_f, macs_d, count_params(fact), count_params(dense), layer_times, notes,
    )
