"""`lowrank bench`: latency of a factorized model against its dense baseline, and of each factorized layer.

The baseline and the factorized model are timed in the same process, interleaved, after
warm-up (`measure.time_interleaved`). The ideal speedup is the MAC ratio; efficiency =
measured / ideal.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import subprocess
import sys
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
from lowrank_cli.export.onnx_cache import OrtDecoder, cache_layout, export_decoder
from lowrank_cli.io.manifest import Manifest
from lowrank_cli.io.safetensors import read_header
from lowrank_cli.measure.generation import GenerationTiming, time_generation, weight_bytes_per_token
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.measure.memory import peak_resident_bytes, reset_peak, resident_bytes
from lowrank_cli.measure.timing import (LayerTiming, Timing, check_ort_device, check_runtime, layer_shapes, ort_cuda_available, ort_session,
                                        time_interleaved, time_linear_layers, torch_threads)
from lowrank_cli.models.build import DEFAULT_FAMILY, build_model
from lowrank_cli.models.family import Inputs, ModelFamily, get_family, inputs_to
from lowrank_cli.models.skeleton import build_skeleton
from lowrank_cli.nn.lowrank import inference_layout
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
        dense = _dense_baseline(fact, baseline, manifest, family)
    fact, dense = fact.float().eval().to(dev), dense.float().eval().to(dev)
    inference_layout(fact)  # as `lowrank_cli.load` gives it
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


# --- generation: prefill, first token and decode with a KV cache ------------------------------

DEFAULT_PROMPT_LEN = 32


@dataclass
class MemoryUse:
    """What loading a model and generating with it add to a fresh process (bytes): the peak resident memory over the
    memory after imports (on a GPU: CUDA's peak allocation), against the weights and the KV cache it holds at the end."""

    after_imports: int
    peak: int
    weights: int
    kv_cache: int
    device_peak: int | None = None  # on a GPU: the most memory CUDA allocated (where the weights and the cache are)

    @property
    def added(self) -> int:
        """What the process added: on a GPU, CUDA's peak allocation; on the CPU, the peak resident memory over the memory after imports."""
        return self.device_peak if self.device_peak is not None else self.peak - self.after_imports

    @property
    def ratio(self) -> float:
        """Added memory / (weights + KV cache): 1.0 is no overhead."""
        return self.added / max(1, self.weights + self.kv_cache)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "added": self.added, "ratio": self.ratio}


@dataclass
class GenerationRow:
    """Both models' generation at one batch size."""

    batch: int
    dense: GenerationTiming
    factorized: GenerationTiming

    def speedup(self, phase: str) -> float:
        """Dense time / factorized time of `prefill`, `ttft` or `decode` (medians)."""
        return getattr(self.dense, phase).median_s / getattr(self.factorized, phase).median_s


@dataclass
class GenerationBenchResult:
    """What `lowrank bench --generate` measured. Bytes per token: weights one decoding step reads; MACs: one prompt's prefill."""

    model: str
    baseline: str
    runtime: str
    device: str
    threads: int
    prompt_len: int
    new_tokens: int
    compiled: bool
    params_factorized: int
    params_dense: int
    bytes_per_token_factorized: int
    bytes_per_token_dense: int
    prefill_macs_factorized: int
    prefill_macs_dense: int
    rows: list[GenerationRow]
    memory: dict[str, MemoryUse] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ideal_decode_speedup(self) -> float:
        return self.bytes_per_token_dense / self.bytes_per_token_factorized

    @property
    def ideal_prefill_speedup(self) -> float:
        return self.prefill_macs_dense / self.prefill_macs_factorized

    def efficiency(self, row: GenerationRow, phase: str) -> float:
        """Measured speedup / ideal: decode against the weight bytes, prefill and time to first token against the MACs."""
        return row.speedup(phase) / (self.ideal_decode_speedup if phase == "decode" else self.ideal_prefill_speedup)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("rows", "memory")}
        d.update(ideal_decode_speedup=self.ideal_decode_speedup, ideal_prefill_speedup=self.ideal_prefill_speedup)
        d["rows"] = [{"batch": r.batch, **{name: {**asdict(t), "prefill_tokens_per_s": t.prefill_tokens_per_s, "decode_tokens_per_s": t.decode_tokens_per_s}
                                           for name, t in (("dense", r.dense), ("factorized", r.factorized))},
                      **{f"{p}_speedup": r.speedup(p) for p in ("prefill", "ttft", "decode")},
                      **{f"{p}_efficiency": self.efficiency(r, p) for p in ("prefill", "ttft", "decode")}} for r in self.rows]
        d["memory"] = None if self.memory is None else {k: m.to_dict() for k, m in self.memory.items()}
        return d


def _prompts(family: ModelFamily, model: nn.Module, batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = inputs_to(family.example_inputs(model, batch, seq_len=length, generator=torch.Generator().manual_seed(0)), device)
    return x["input_ids"], x["attention_mask"]


def _compiled(model: nn.Module, compile_model: bool | str) -> nn.Module:
    """The model with its forward compiled by `torch.compile` (dynamic shapes: the cache grows every step); `compile_model`
    a backend name, or True for the default (inductor)."""
    if compile_model:
        kwargs = {"backend": compile_model} if isinstance(compile_model, str) else {}
        model.forward = torch.compile(model.forward, dynamic=True, **kwargs)
    return model


def _check_generation(new_tokens: int, prompt_len: int, batch: int, repeats: int, limit: int | None) -> None:
    if new_tokens < 2:
        raise LowrankError(f"generate {new_tokens}: at least 2 new tokens (the first token and one decode step)", param="generate")
    for name, value in (("prompt_len", prompt_len), ("batch", batch), ("repeats", repeats)):
        if value < 1:
            raise LowrankError(f"{name} {value}: must be at least 1", param=name)
    if limit is not None and prompt_len + new_tokens - 1 > limit:  # the last token is chosen, never fed back
        raise LowrankError(f"prompt_len {prompt_len} + generate {new_tokens} tokens needs {prompt_len + new_tokens - 1} positions, above the "
                           f"model's maximum of {limit}", param="generate")


@dataclass
class GenerationSettings:
    """How `bench_generation` times: `new_tokens` per run, at batch 1 and `batch`, after `prompt_len` prompt tokens; `threads`
    (CPU), `runtime`, `device`; `compile`: `torch.compile` the models (True, or a backend's name); `memory`: also measure
    what loading and generating add to a fresh process."""

    new_tokens: int = 64
    batch: int = 8
    prompt_len: int = DEFAULT_PROMPT_LEN
    threads: int | None = None
    runtime: str = "torch"
    device: str | torch.device | None = None
    compile: bool | str = False
    warmup: int = 1
    repeats: int = 3
    memory: bool = True


def bench_generation(model: str | os.PathLike | None, baseline: str | os.PathLike | None = None,
                     settings: GenerationSettings | None = None, runs_dir: str | os.PathLike | None = None) -> GenerationBenchResult:
    """Greedy generation with a KV cache, factorized vs dense in the same process, interleaved: prefill and decode tokens
    per second and time to first token at batch 1 and `settings.batch`, against the ideal speedups (decode: the ratio of
    weight bytes read per token; prefill: of MACs); and, in a fresh process each, the memory that loading and generating add.
    The dense model is `baseline` or the factorized one merged dense (see `bench_checkpoint`)."""
    s = settings or GenerationSettings()
    check_runtime(s.runtime)
    ort = s.runtime == "onnxruntime"
    if ort and s.compile:
        raise LowrankError("compile applies to the torch runtime; onnxruntime runs the exported graph", param="compile")
    dev = _generation_device(s)
    path = resolve_model_path(model, runs_dir or RUNS_DIR)
    _, manifest = require_manifest(path, "lowrank bench", need_architecture=True)
    family = get_family(manifest.family or DEFAULT_FAMILY)
    with family.exportable() if ort else contextlib.nullcontext():  # the ONNX path wants export-friendly modules
        fact = build_model(path).model
        family.decoder(fact)  # a model that does not generate is refused before anything else is built
        _check_generation(s.new_tokens, s.prompt_len, s.batch, s.repeats, family.max_positions(fact))
        dense = _dense_baseline(fact, baseline, manifest, family)
    fact, dense = fact.float().eval().to(dev), dense.float().eval().to(dev)
    inference_layout(fact)  # as `lowrank_cli.load` gives it
    ids, mask = _prompts(family, fact, 1, s.prompt_len, dev)
    prefill = lambda m, x: family.decoder(m).prefill(x["ids"], x["mask"])  # noqa: E731
    macs = {k: count_macs(m, {"ids": ids, "mask": mask}, prefill).macs for k, m in (("f", fact), ("d", dense))}
    sizes = {k: (count_params(m), weight_bytes_per_token(m)) for k, m in (("f", fact), ("d", dense))}
    with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp, torch_threads(s.threads) as n_threads:
        if ort:
            decoders = {name: _ort_decoder(m, family, Path(tmp) / f"{name}.onnx", s.threads, dev) for name, m in (("dense", dense), ("factorized", fact))}
        else:
            decoders = {"dense": family.decoder(_compiled(dense, s.compile)), "factorized": family.decoder(_compiled(fact, s.compile))}
        rows = []
        for b in sorted({1, s.batch}):
            ids, mask = _prompts(family, fact, b, s.prompt_len, torch.device("cpu") if ort else dev)
            t = time_generation(decoders, ids, mask, s.new_tokens, warmup=s.warmup, repeats=s.repeats, device=torch.device("cpu") if ort else dev)
            rows.append(GenerationRow(b, t["dense"], t["factorized"]))
    notes = [f"{n_threads} threads on {os.cpu_count()} CPU cores: oversubscribed"] if dev.type == "cpu" and n_threads > (os.cpu_count() or n_threads) else []
    memory = None
    if s.memory and not ort:
        memory, why = _generation_memory(path, baseline, s, dev, n_threads)
        notes += [why] if why else []
    elif s.memory:
        notes.append("memory is measured for the torch runtime (run without --runtime onnxruntime)")
    return GenerationBenchResult(
        model=str(path), baseline=str(baseline) if baseline else "merged dense (W = up·down)", runtime=s.runtime, device=str(dev),
        threads=n_threads, prompt_len=s.prompt_len, new_tokens=s.new_tokens, compiled=bool(s.compile),
        params_factorized=sizes["f"][0], params_dense=sizes["d"][0], bytes_per_token_factorized=sizes["f"][1], bytes_per_token_dense=sizes["d"][1],
        prefill_macs_factorized=macs["f"], prefill_macs_dense=macs["d"], rows=rows, memory=memory, notes=notes,
    )


def _generation_device(s: GenerationSettings) -> torch.device:
    """The device generation is timed on; onnxruntime's `auto` is the CPU unless onnxruntime-gpu is installed."""
    dev = resolve_device(s.device)
    if s.runtime == "onnxruntime":
        if dev.type == "cuda" and str(s.device or "auto") == "auto" and not ort_cuda_available():
            dev = torch.device("cpu")
        check_ort_device(dev)
    return dev


def _ort_decoder(model: nn.Module, family: ModelFamily, dest: Path, threads: int | None, dev: torch.device):
    """`model` exported with its KV cache (`export.onnx_cache`) to `dest` and opened in onnxruntime on `dev`."""
    model = model.cpu()
    export_decoder(model, cache_layout(model), dest, max_length=family.max_positions(model))
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if dev.type == "cuda" else ["CPUExecutionProvider"]
    return OrtDecoder.from_path(dest, threads, providers)


def _dense_baseline(fact: nn.Module, baseline: str | os.PathLike | None, manifest, family: ModelFamily) -> nn.Module:
    """The dense model to compare with: `baseline` built with the factorized model's architecture, or `fact` merged dense."""
    if baseline is None:
        return merge_model(copy.deepcopy(fact))
    base = build_model(Path(baseline), manifest.architecture, manifest.model_kwargs, family=family.name)
    if base.manifest is not None:  # timing low rank against low rank says nothing
        raise LowrankError(f"baseline {baseline}: is a factorized checkpoint; give the dense original, or no baseline to time the model merged dense",
                           param="baseline")
    return base.model


MEMORY_TIMEOUT_S = 3600


def _generation_memory(path: Path, baseline, s: GenerationSettings, dev: torch.device,
                       threads: int) -> tuple[dict[str, MemoryUse] | None, str | None]:
    """`memory_child` of the factorized model (and of the baseline when given), each in a fresh Python process; None and
    the reason where it could not be measured."""
    out = {}
    for name, spec in (("factorized", {"path": str(path)}), ("dense", {"path": str(baseline), "like": str(path)} if baseline else None)):
        if spec is None:
            continue
        spec.update(batch=s.batch, prompt_len=s.prompt_len, new_tokens=s.new_tokens, device=str(dev), threads=threads)
        code = "import sys; from lowrank_cli.pipelines.bench import memory_child; memory_child(sys.argv[1])"
        try:
            done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, timeout=MEMORY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"memory not measured: the measuring process ran over {MEMORY_TIMEOUT_S} s"
        lines = done.stdout.strip().splitlines()
        try:
            if done.returncode != 0 or not lines:
                raise ValueError(done.returncode)
            found = json.loads(lines[-1])
            use = None if found is None else MemoryUse(**found)
        except (ValueError, TypeError):
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"memory not measured: the measuring process failed ({why})"
        if use is None:
            return None, "memory not measured: this system cannot reset a process's peak memory (Linux /proc/self/clear_refs)"
        out[name] = use
    if not baseline:
        return out, "memory of the dense model not measured: it is the factorized one merged in the process; give --baseline to measure it"
    return out, None


def memory_child(spec_json: str) -> None:
    """In a fresh process: print, as JSON, the `MemoryUse` of loading the model `spec['path']` (in fp32) and generating
    `new_tokens` after `batch × prompt_len` prompt tokens, or null where the peak cannot be reset."""
    spec = json.loads(spec_json)
    dev = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    like = None if "like" not in spec else require_manifest(Path(spec["like"]), "lowrank bench", need_architecture=True)[1]
    recorded = like or Manifest.from_header(read_header(Path(spec["path"])))
    build_skeleton(get_family(recorded.family or DEFAULT_FAMILY), recorded.architecture, recorded.model_kwargs)  # the model's code imported
    gc.collect()
    if not reset_peak():
        print("null")
        return
    after_imports = resident_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if like is None:
        built = build_model(Path(spec["path"]))
    else:
        built = build_model(Path(spec["path"]), like.architecture, like.model_kwargs, family=like.family or DEFAULT_FAMILY)
    family, model = built.family, built.model.float().eval().to(dev)
    inference_layout(model)  # as the timed model is
    decoder = family.decoder(model)
    ids, mask = _prompts(family, model, spec["batch"], spec["prompt_len"], dev)
    logits, state = decoder.prefill(ids, mask)
    for _ in range(spec["new_tokens"] - 1):
        logits, state = decoder.step(logits.argmax(-1, keepdim=True), state)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    device_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    print(json.dumps({"after_imports": after_imports, "peak": peak_resident_bytes() or 0, "weights": weights, "kv_cache": decoder.state_bytes(state),
                      "device_peak": device_peak}))
