"""`lowrank bench`: latency of a factorized model against its dense baseline, and of each factorized layer.

The baseline and the factorized model are timed in the same process, interleaved, after
warm-up (`measure.time_interleaved`). The ideal speedup is the MAC ratio; efficiency =
measured / ideal.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.device import resolve_device
from lowrank_cli.errors import LowrankError
from lowrank_cli.export.dense import merge_model
from lowrank_cli.export.onnx import onnx_export_model
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.measure.timing import (LayerTiming, Timing, check_ort_device, check_runtime, layer_shapes, ort_cuda_available, ort_session,
                                        time_interleaved, time_linear_layers, torch_threads)
from lowrank_cli.models.build import DEFAULT_FAMILY, build_model
from lowrank_cli.models.family import Inputs, ModelFamily, get_family, inputs_to
from lowrank_cli.pipelines.common import RUNS_DIR, require_manifest, resolve_model_path


@dataclass
class BenchResult:
    """What `lowrank bench` measured. MACs per example; times in seconds per batch."""

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
    seq_len: int | None = None  # text models: tokens per example
    providers: list[str] | None = None  # onnxruntime: the execution providers the sessions actually use

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


def _onnx_runner(family: ModelFamily, model: nn.Module, tmp: Path, name: str, threads: int | None, device: torch.device, x: Inputs):
    path = tmp / f"{name}.onnx"
    x = inputs_to(x, "cpu")
    onnx_export_model(model, path, x, forward=family.forward, max_length=family.max_positions(model))
    sess = ort_session(path, threads, device)
    names = [i.name for i in sess.get_inputs()]
    feed = {k: v.numpy() for k, v in x.items() if k in names} if isinstance(x, dict) else {names[0]: x.numpy()}
    run = lambda: sess.run(None, feed)  # noqa: E731
    run.providers = list(sess.get_providers())
    return run


def _torch_runner(family: ModelFamily, model: nn.Module, x: Inputs):
    def run():
        with torch.inference_mode():
            return family.forward(model, x)
    return run


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
    seq_len: int | None = None,
) -> BenchResult:
    """Latency of a factorized checkpoint vs its dense baseline in the same process, interleaved.

    The baseline is `baseline` (e.g. the teacher checkpoint, built with the factorized
    model's architecture) or, without one, the same model with every `LowRankLinear`
    merged back to a dense `nn.Linear`.
    """
    check_runtime(runtime)
    if batch < 1:
        raise LowrankError(f"batch {batch}: must be at least 1", param="batch")
    if repeats < 1 or warmup < 0:
        raise LowrankError(f"repeats {repeats} / warmup {warmup}: need at least 1 repeat and no negative warm-up", param="repeats")
    dev = resolve_device(device)
    notes = []
    if runtime == "onnxruntime":
        if dev.type == "cuda" and str(device or "auto") == "auto" and not ort_cuda_available():  # auto: where onnxruntime can run
            dev = torch.device("cpu")
            notes.append("device auto: onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed), so it runs on the CPU")
        check_ort_device(dev)
    path = resolve_model_path(model, runs_dir or RUNS_DIR)
    _, manifest = require_manifest(path, "lowrank bench", need_architecture=True)
    family = get_family(manifest.family or DEFAULT_FAMILY)
    with family.exportable() if runtime == "onnxruntime" else contextlib.nullcontext():  # the ONNX path wants export-friendly modules
        fact = build_model(path).model
        if baseline is not None:
            base = build_model(Path(baseline), manifest.architecture, manifest.model_kwargs, family=family.name)
            if base.manifest is not None:  # timing low rank against low rank says nothing
                raise LowrankError(f"baseline {baseline}: is a factorized checkpoint; give the dense original, or no baseline to time the model merged dense", param="baseline")
            dense = base.model
        else:
            dense = merge_model(copy.deepcopy(fact))
    fact, dense = fact.float().eval().to(dev), dense.float().eval().to(dev)
    length = family.text_length(fact, seq_len)
    one = family.example_inputs(fact, seq_len=length)
    macs_f, macs_d = count_macs(fact, one, family.forward), count_macs(dense, one, family.forward)
    x = inputs_to(family.example_inputs(fact, batch, seq_len=length), dev)
    providers = None
    with torch_threads(threads) as n_threads:
        if runtime == "torch":
            runners = {"dense": _torch_runner(family, dense, x), "factorized": _torch_runner(family, fact, x)}
            timings = time_interleaved(runners, warmup=warmup, repeats=repeats, device=dev)
        else:
            with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp:
                runners = {
                    "dense": _onnx_runner(family, dense.cpu(), Path(tmp), "dense", threads, dev, x),
                    "factorized": _onnx_runner(family, fact.cpu(), Path(tmp), "factorized", threads, dev, x),
                }
                timings = time_interleaved(runners, warmup=warmup, repeats=repeats, device=torch.device("cpu"))
                providers = runners["factorized"].providers
        layer_times = None
        if layers:
            layer_times = time_linear_layers(layer_shapes(fact, macs_f.linear_rows), batch, device=dev, runtime=runtime, threads=threads)
    if dev.type == "cpu" and os.cpu_count() and n_threads > os.cpu_count():
        notes.append(f"{n_threads} threads on {os.cpu_count()} CPU cores: oversubscribed")
    return BenchResult(
        str(path), str(baseline) if baseline else "merged dense (W = up·down)", runtime, str(dev), batch, n_threads,
        timings["factorized"], timings["dense"], macs_f.macs, macs_d.macs, count_params(fact), count_params(dense), layer_times, notes, length, providers,
    )
