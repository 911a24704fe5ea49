"""Export a factorized checkpoint: ONNX (verified against PyTorch), dense timm weights, or a cast copy.

- `onnx`: `torch.onnx.export` (the dynamo exporter) with a dynamic batch axis, built under
  timm's `set_exportable(True)`; checked with `onnx.checker` (full check) and verified with
  onnxruntime against PyTorch at two batch sizes. Each `LowRankLinear` stays two MatMuls.
- `dense`: every `<layer>.down/up` pair merged back into `<layer>.weight = up · down`: a plain
  timm state dict that `timm.create_model(arch, checkpoint_path=...)` loads strictly.
- `safetensors`: the factorized checkpoint and its manifest, cast to another dtype.

Every output is written to a temporary file and renamed into place only when it is complete
and verified, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lowrank_cli.checkpoint import CheckpointHeader, atomic_output, load_tensors, read_header, save_checkpoint
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize import LowRankLinear, set_submodule

FORMATS = ("onnx", "dense", "safetensors")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ONNX_TOLERANCE = 1e-3  # max |onnxruntime − PyTorch| on the logits above which an export fails
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's 2 GB limit: larger models keep weights in <out>.data
DEFAULT_OPSET = 18
VERIFY_BATCHES = (1, 3)  # two batch sizes, neither equal to the export's sample batch of 2
RUNS_DIR = Path("runs")
STUDENT_FILE = "student.safetensors"


@dataclass
class ExportResult:
    """What `lowrank export` wrote. Sizes in bytes, MACs per image (None without an architecture)."""

    format: str
    source: str
    out: str
    bytes_before: int
    bytes_after: int
    params: int
    macs: int | None
    dtype: str
    architecture: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    factorized_layers: int = 0
    verification: dict[str, Any] | None = None  # what was checked, and its max abs diff
    onnx_ops: dict[str, int] | None = None  # MatMul / Gemm node counts of an ONNX export
    extra_files: list[str] = field(default_factory=list)  # e.g. the ONNX external data file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- finding the model ------------------------------------------------------------------------

def _has_manifest(path: Path) -> bool:
    try:
        return read_header(path).manifest is not None
    except LowrankError:
        return False


def checkpoint_in_run(run: Path) -> Path:
    """The checkpoint a run directory holds: `student.safetensors`, else its newest factorized `*.safetensors`."""
    student = run / STUDENT_FILE
    if student.is_file():
        return student
    candidates = sorted((p for p in run.glob("*.safetensors") if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        if _has_manifest(p):
            return p
    raise LowrankError(
        f"{run}: no {STUDENT_FILE} and no factorized *.safetensors (one with a lowrank manifest) in this run directory"
    )


def resolve_model_path(model: str | os.PathLike | None, runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    """A checkpoint file as given; a run directory's checkpoint; or, with None, the newest run's under `runs_dir`."""
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise LowrankError(f"{path}: no such file or run directory")
        return checkpoint_in_run(path) if path.is_dir() else path
    runs = Path(runs_dir)
    if not runs.is_dir():
        raise LowrankError(f"no MODEL given and no {runs}/ directory here; pass a factorized checkpoint or a run directory")
    dirs = sorted((d for d in runs.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs:
        with contextlib.suppress(LowrankError):
            return checkpoint_in_run(d)
    raise LowrankError(f"no MODEL given and no run under {runs}/ holds a {STUDENT_FILE} or a factorized checkpoint")


def _purpose(fmt: str) -> str:
    return "lowrank bench" if fmt == "bench" else f"export --format {fmt}"


def require_manifest(path: Path, fmt: str, need_architecture: bool) -> tuple[CheckpointHeader, dict[str, Any]]:
    """The header and manifest of a factorized checkpoint, or a sentence saying why it is not one."""
    header = read_header(path)
    manifest = header.manifest
    if manifest is None:
        raise LowrankError(
            f"{path}: is not a factorized checkpoint (no lowrank manifest); {_purpose(fmt)} needs the output "
            "of `lowrank factorize` or of a training run"
        )
    if need_architecture and manifest.get("architecture") is None:
        raise LowrankError(
            f"{path}: was factorized weight-only (no timm architecture recorded), so {_purpose(fmt)} cannot build it; "
            "export it with --format dense or --format safetensors"
        )
    return header, manifest


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LowrankError(f"--dtype '{name}' is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_output(path: Path, fmt: str, dtype: str) -> Path:
    """`<stem>.onnx`, `<stem>.dense.safetensors` or `<stem>.<dtype>.safetensors` beside the input."""
    stem = path.name.removesuffix(".safetensors")
    suffix = {"onnx": ".onnx", "dense": ".dense.safetensors", "safetensors": f".{dtype}.safetensors"}[fmt]
    return path.with_name(stem + suffix)


def _precheck_output(out: Path, force: bool, source: Path) -> None:
    """Fail before any long work; `atomic_output` checks again when the file is written."""
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise LowrankError(f"{out}: refusing to overwrite the input checkpoint; choose another --out")
    if out.exists() and not force:
        raise LowrankError(f"{out}: already exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise LowrankError(f"{out.parent}: output directory does not exist")


# --- dense and safetensors --------------------------------------------------------------------

def merge_state_dict(tensors: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Each factorized `<layer>.down/up` pair becomes `<layer>.weight = up · down` (fp32 product) and `<layer>.bias`.

    Works on the state dict alone, so weight-only checkpoints merge too; key order is kept.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        layer, _, leaf = key.rpartition(".")
        parent, _, half = layer.rpartition(".")
        if parent in layers and half == "down" and leaf == "weight":
            up = tensors[f"{parent}.up.weight"]
            out[f"{parent}.weight"] = (up.float() @ value.float()).to(value.dtype)
            if f"{parent}.up.bias" in tensors:
                out[f"{parent}.bias"] = tensors[f"{parent}.up.bias"]
        elif parent in layers and half in ("down", "up"):
            continue  # folded into <parent>.weight / .bias above
        else:
            out[key] = value
    return out


def merge_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every `LowRankLinear` by its merged dense `nn.Linear`; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            set_submodule(model, name, module.merge())
    return model


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    kinds = sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()})
    return "+".join(kinds) or "none"


@torch.no_grad()
def _max_abs_diff(a: nn.Module, b: nn.Module, input_size: tuple[int, ...], batch: int = 2, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_size, generator=gen)
    return (a(x).float() - b(x).float()).abs().max().item()


def export_dense(path: Path, out: Path, *, dtype: str | None = None, force: bool = False) -> ExportResult:
    """Merge every factorized layer back to one dense weight and write a plain (timm) state dict.

    With an architecture, the result is loaded strictly into `timm.create_model(arch, ...)` and
    its outputs compared with the factorized model's (the verification in the report).
    """
    from lowrank_cli.flops import count_macs, count_params, model_input_size
    from lowrank_cli.models import build_model, create_model, load_state_dict_strict

    header, manifest = require_manifest(path, "dense", need_architecture=False)
    _precheck_output(out, force, path)
    cast = parse_dtype(dtype) if dtype else None
    dense_sd = _cast(merge_state_dict(load_tensors(path), manifest["layers"]), cast)
    arch, kwargs = manifest.get("architecture"), manifest.get("model_kwargs", {})
    params, macs, verification = sum(v.numel() for v in dense_sd.values() if v.is_floating_point()), None, None
    if arch is not None:
        factorized, _ = build_model(path)
        dense = create_model(arch, kwargs).eval()
        load_state_dict_strict(dense, dense_sd, out, arch)  # exactly what timm's strict load will see
        dense.float()
        diff = _max_abs_diff(factorized.float(), dense, model_input_size(dense))
        params, macs = count_params(dense), count_macs(dense).macs
        verification = {"check": "strict load into timm.create_model; outputs vs the factorized model", "max_abs_diff": diff}
    save_checkpoint(out, dense_sd, None, force=force, inputs=(path,))
    return ExportResult(
        "dense", str(path), str(out), path.stat().st_size, out.stat().st_size, params, macs, _dtype_name(dense_sd),
        arch, kwargs, len(manifest["layers"]), verification,
    )


def export_safetensors(path: Path, out: Path, *, dtype: str = "float32", force: bool = False) -> ExportResult:
    """The factorized checkpoint with its manifest, every floating-point tensor cast to `dtype`."""
    header, manifest = require_manifest(path, "safetensors", need_architecture=False)
    _precheck_output(out, force, path)
    tensors = _cast(load_tensors(path), parse_dtype(dtype))
    save_checkpoint(out, tensors, manifest, force=force, inputs=(path,))
    check = read_header(out)  # the written file is what a user will load: its dtypes and manifest
    written = sorted({t.dtype for t in check.tensors.values()})
    verification = {"check": "re-read header: dtypes and manifest", "dtypes": written, "manifest_kept": check.manifest == manifest}
    return ExportResult(
        "safetensors", str(path), str(out), path.stat().st_size, out.stat().st_size,
        sum(t.numel for t in header.tensors.values()), None, dtype,
        manifest.get("architecture"), manifest.get("model_kwargs", {}), len(manifest["layers"]), verification,
    )


# --- ONNX -------------------------------------------------------------------------------------

def build_exportable(path: Path, img_size: int | None = None) -> nn.Module:
    """The factorized model, built under timm's `set_exportable(True)`, in fp32, at `img_size` when given."""
    import timm.layers

    from lowrank_cli.flops import model_input_size
    from lowrank_cli.models import build_model

    with timm.layers.set_exportable(True):
        model, _ = build_model(path)
    model = model.float().eval()
    if img_size is not None and model_input_size(model)[1:] != (img_size, img_size):
        if not hasattr(model, "set_input_size"):
            raise LowrankError(f"--img-size {img_size}: {type(model).__name__} cannot change its input size after building")
        try:
            model.set_input_size(img_size=img_size)  # resamples position embeddings / window masks
        except Exception as e:  # noqa: BLE001 - timm raises assorted errors for impossible sizes
            raise LowrankError(f"--img-size {img_size}: not a valid input size for this model ({e})") from None
    return model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints progress lines and deprecation warnings; keep the CLI's output clean."""
    import io
    import logging
    import sys

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)
            sys.stdout.flush()


def onnx_export_model(model: nn.Module, dest: Path, input_size: tuple[int, ...], opset: int = DEFAULT_OPSET, external_data: bool | None = None) -> bool:
    """`torch.onnx.export` (dynamo) of `model` to `dest` with a dynamic batch axis; returns whether weights went to `dest.data`.

    The dynamo exporter keeps each `LowRankLinear` as two MatMuls and gives a graph about
    half the size of the legacy TorchScript exporter's (443 vs 871 nodes for DeiT-B).
    """
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) >= EXTERNAL_DATA_BYTES
    sample = torch.randn(2, *input_size)  # batch 2, so the exporter does not specialise a batch of 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet():
            program = torch.onnx.export(
                model, (sample,), input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=external_data,
            )
            program.save(str(dest), external_data=external_data)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; the user needs the first line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowrankError(f"torch.onnx.export failed for {type(model).__name__} at opset {opset}: {msg}") from None
    return external_data


def onnx_op_counts(path: Path) -> dict[str, int]:
    """Number of nodes of each op type in an ONNX graph (weights not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(n.op_type for n in graph.node))


def run_onnxruntime(path: Path, x: torch.Tensor) -> torch.Tensor:
    """One forward pass of an ONNX file in onnxruntime on the CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@torch.no_grad()
def verify_onnx(path: Path, model: nn.Module, input_size: tuple[int, ...], batches: tuple[int, ...] = VERIFY_BATCHES, seed: int = 0) -> dict[str, Any]:
    """Max |onnxruntime − PyTorch| over random inputs at each batch size."""
    gen = torch.Generator().manual_seed(seed)
    diffs = {}
    for b in batches:
        x = torch.randn(b, *input_size, generator=gen)
        try:
            got = run_onnxruntime(path, x)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors are many; report the first line
            raise LowrankError(f"onnxruntime could not run the exported model at batch {b}: {str(e).splitlines()[0]}") from None
        want = model(x)
        if tuple(got.shape) != tuple(want.shape):
            raise LowrankError(f"onnxruntime output shape {list(got.shape)} differs from PyTorch's {list(want.shape)} at batch {b}")
        diffs[b] = (got.float() - want.float()).abs().max().item()
    return {"check": "onnxruntime vs PyTorch on random inputs", "batches": list(batches),
            "max_abs_diff": max(diffs.values()), "per_batch": diffs, "tolerance": ONNX_TOLERANCE}


def export_onnx(path: Path, out: Path, *, img_size: int | None = None, opset: int = DEFAULT_OPSET, force: bool = False) -> ExportResult:
    """Export to ONNX, check it, verify it against PyTorch, and only then move it to `out`."""
    import onnx

    from lowrank_cli.flops import count_macs, count_params, model_input_size

    header, manifest = require_manifest(path, "onnx", need_architecture=True)
    _precheck_output(out, force, path)
    if not 7 <= opset <= 23:
        raise LowrankError(f"--opset {opset} is not supported; use 18 (the default) or another opset from 7 to 23")
    model = build_exportable(path, img_size)
    input_size = model_input_size(model)
    n_factorized = sum(isinstance(m, LowRankLinear) for m in model.modules())
    data_name = out.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name  # staged under the final name: external data is referenced by file name
        external = onnx_export_model(model, staged, input_size, opset)
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as e:  # noqa: BLE001 - onnx raises ValidationError and friends
            raise LowrankError(f"the exported ONNX graph fails onnx.checker: {str(e).splitlines()[0]}") from None
        ops = onnx_op_counts(staged)
        if ops.get("MatMul", 0) + ops.get("Gemm", 0) < 2 * n_factorized:
            raise LowrankError(
                f"the exported graph has {ops.get('MatMul', 0)} MatMul + {ops.get('Gemm', 0)} Gemm nodes for "
                f"{n_factorized} factorized layers (expected at least two each): the exporter merged them"
            )
        verification = verify_onnx(staged, model, input_size)
        if not verification["max_abs_diff"] <= ONNX_TOLERANCE:  # `not <=` also catches NaN
            raise LowrankError(
                f"the ONNX export of {path} differs from PyTorch by {verification['max_abs_diff']:.3g} "
                f"(max abs, batches {list(VERIFY_BATCHES)}), above the {ONNX_TOLERANCE:g} tolerance; nothing was written"
            )
        extra = []
        if external:
            with atomic_output(out.with_name(data_name), force=force, inputs=(path,)) as tmp_data:
                shutil.move(str(Path(tmp) / data_name), tmp_data)
            extra.append(str(out.with_name(data_name)))
        with atomic_output(out, force=force, inputs=(path,)) as tmp_out:
            shutil.move(str(staged), tmp_out)
    size_after = out.stat().st_size + sum(Path(p).stat().st_size for p in extra)
    return ExportResult(
        "onnx", str(path), str(out), path.stat().st_size, size_after, count_params(model),
        count_macs(model).macs, "float32", manifest["architecture"], manifest.get("model_kwargs", {}),
        n_factorized, verification, {"MatMul": ops.get("MatMul", 0), "Gemm": ops.get("Gemm", 0), "nodes": sum(ops.values())}, extra,
    )


def export_checkpoint(
    model: str | os.PathLike | None,
    fmt: str,
    out: str | os.PathLike | None = None,
    *,
    img_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    dtype: str | None = None,
    force: bool = False,
    runs_dir: str | os.PathLike = RUNS_DIR,
) -> ExportResult:
    """Export a factorized checkpoint (or a run directory's, or the newest run's) as `fmt`."""
    if fmt not in FORMATS:
        raise LowrankError(f"--format '{fmt}' is not supported; use one of {', '.join(FORMATS)}")
    if dtype is not None:
        parse_dtype(dtype)
    if fmt == "onnx" and dtype not in (None, "float32"):
        raise LowrankError(f"--dtype {dtype} is not supported for --format onnx (exports are float32 and verified at 1e-3)")
    path = resolve_model_path(model, runs_dir)
    out_path = Path(out) if out is not None else default_output(path, fmt, dtype or "float32")
    if fmt == "onnx":
        return export_onnx(path, out_path, img_size=img_size, opset=opset, force=force)
    if img_size is not None:
        raise LowrankError(f"--img-size applies to --format onnx only, not {fmt}")
    if fmt == "dense":
        return export_dense(path, out_path, dtype=dtype, force=force)
    return export_safetensors(path, out_path, dtype=dtype or "float32", force=force)
