"""`lowrank export`: a factorized checkpoint (or a run's student) as a deployable artifact.

- `onnx`: the model built in its family's export-friendly form, exported by the dynamo
  exporter with a dynamic batch axis, checked and verified against PyTorch (`export.onnx`).
- `dense`: every `<layer>.down/up` pair merged back into `<layer>.weight = up · down`: a plain
  state dict that the model's library loads strictly (timm: `create_model(arch, checkpoint_path=...)`).
- `safetensors`: the factorized checkpoint and its manifest, cast to another dtype.

Every output is written to a temporary file and renamed into place only when it is complete
and verified, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.export.cast import cast_tensors, dtype_name, parse_dtype
from lowrank_cli.export.dense import merge_state_dict
from lowrank_cli.export.onnx import DEFAULT_OPSET, check_opset, write_verified_onnx
from lowrank_cli.io.atomic import atomic_folder, check_output, check_output_folder
from lowrank_cli.io.hub import copy_side_files
from lowrank_cli.io.manifest import Manifest, read_checkpoint, save_factorized
from lowrank_cli.io.safetensors import read_header, save_checkpoint
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.models.build import Built, build_model, load_state_dict_strict
from lowrank_cli.models.family import ModelFamily, get_family
from lowrank_cli.nn.lowrank import LowRankLinear
from lowrank_cli.pipelines.common import RUNS_DIR, output_beside, require_manifest, resolve_model_path

FORMATS = ("onnx", "dense", "safetensors")


@dataclass
class ExportResult:
    """What `lowrank export` wrote. Sizes in bytes, MACs per example (None without an architecture)."""

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
    family: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_output(path: Path, fmt: str, dtype: str, hub: bool = False) -> Path:
    """`<stem>.onnx`, `<stem>.dense.safetensors` or `<stem>.<dtype>.safetensors` beside the input; for a transformers
    model's dense export, the Hub folder `<folder>.dense` (named after the checkpoint's folder when it has one)."""
    if hub:
        base = path.parent if path.name in ("model.safetensors", "student.safetensors") and (path.parent / "config.json").is_file() else path
        return output_beside(base, ".dense")
    return output_beside(path, {"onnx": ".onnx", "dense": ".dense.safetensors", "safetensors": f".{dtype}.safetensors"}[fmt])


TEXT_LENGTHS = {1: 7, 2: 12, 3: 19}  # tokens per example of a text model's export sample (batch 2) and its two checks


def input_maker(family: ModelFamily, model: nn.Module):
    """(batch, generator) → random inputs: images of the model's size, or text whose length changes with the batch."""
    limit = family.max_positions(model)
    if limit is None:
        return lambda b, g: family.example_inputs(model, b, generator=g)
    return lambda b, g: family.example_inputs(model, b, generator=g, seq_len=min(TEXT_LENGTHS.get(b, 16), limit))


@torch.no_grad()
def _max_abs_diff(family: ModelFamily, a: nn.Module, b: nn.Module, seed: int = 0) -> float:
    x = family.example_inputs(a, 2, generator=torch.Generator().manual_seed(seed))
    return (family.forward(a, x).float() - family.forward(b, x).float()).abs().max().item()


def _macs(built_model: nn.Module, family: ModelFamily) -> int:
    return count_macs(built_model, family.example_inputs(built_model), family.forward).macs


def export_dense(path: Path, out: Path, *, dtype: str | None = None, force: bool = False) -> ExportResult:
    """Merge every factorized layer back to one dense weight and write a plain state dict.

    With an architecture, the result is loaded strictly into the family's freshly built model
    and its outputs compared with the factorized model's (the verification in the report).
    """
    header, manifest = require_manifest(path, "export as dense", need_architecture=False)
    if manifest.family == "transformers":
        return export_dense_hub(path, out, header, manifest, dtype=dtype, force=force)
    check_output(out, force=force, inputs=(path,))
    cast = parse_dtype(dtype) if dtype else None
    dense_sd = cast_tensors(merge_state_dict(read_checkpoint(path)[2], manifest.layers), cast)
    params, macs, verification = sum(v.numel() for v in dense_sd.values() if v.is_floating_point()), None, None
    if not manifest.weight_only:
        factorized = build_model(path)
        family = factorized.family
        dense = family.create(manifest.architecture, manifest.model_kwargs).eval()
        load_state_dict_strict(dense, dense_sd, out, manifest.architecture)  # exactly what the library's strict load will see
        dense.float()
        diff = _max_abs_diff(family, factorized.model.float(), dense)
        params, macs = count_params(dense), _macs(dense, family)
        verification = {"check": f"strict load into a new {family.name} model; outputs vs the factorized model", "max_abs_diff": diff}
    save_checkpoint(out, dense_sd, None, force=force, inputs=(path,))
    return ExportResult(
        "dense", str(path), str(out), path.stat().st_size, out.stat().st_size, params, macs, dtype_name(dense_sd),
        manifest.architecture, manifest.model_kwargs, len(manifest.layers), verification, family=manifest.family,
    )


def export_dense_hub(path: Path, out: Path, header, manifest: Manifest, *, dtype: str | None = None, force: bool = False) -> ExportResult:
    """A transformers model's dense export: a Hub folder (config, merged weights, tokenizer files) that its
    class's `from_pretrained` loads with no missing or unexpected keys; outputs checked against the factorized model."""
    check_output_folder(out, force=force, inputs=(path,))
    cast = parse_dtype(dtype) if dtype else None
    factorized = build_model(path)
    family, model = factorized.family, factorized.model
    dense_sd = cast_tensors(merge_state_dict(read_checkpoint(path)[2], manifest.layers), cast)
    merged = family.create(manifest.architecture, manifest.model_kwargs)
    load_state_dict_strict(merged, dense_sd, path, manifest.architecture)
    with atomic_folder(out, force=force, inputs=(path,)) as tmp:
        merged.save_pretrained(str(tmp))  # the library's own format (its key names, tied weights saved once)
        copy_side_files(header.folder, tmp)
        dense = family.load_dense(tmp, manifest.architecture).float()  # and its own loader, strict
        diff = _max_abs_diff(family, model.float(), dense)
        if not diff <= 1e-3:
            raise LowrankError(f"the dense export of {path} differs from the factorized model by {diff:.3g} (max abs); nothing was written")
        params, macs = count_params(dense), _macs(dense, family)
    written = out / "model.safetensors"
    return ExportResult(
        "dense", str(path), str(out), path.stat().st_size if path.is_file() else header.path.stat().st_size, written.stat().st_size,
        params, macs, dtype_name(dense_sd), manifest.architecture, {}, len(manifest.layers),
        {"check": f"{manifest.architecture}.from_pretrained of the folder: no missing or unexpected keys; outputs vs the factorized model",
         "max_abs_diff": diff}, family="transformers",
    )


def export_safetensors(path: Path, out: Path, *, dtype: str = "float32", force: bool = False) -> ExportResult:
    """The factorized checkpoint with its manifest, every floating-point tensor cast to `dtype`."""
    header, manifest = require_manifest(path, "export as safetensors", need_architecture=False)
    check_output(out, force=force, inputs=(path,))
    tensors = cast_tensors(read_checkpoint(path)[2], parse_dtype(dtype))
    written_manifest = save_factorized(out, tensors, manifest, force=force, inputs=(path,))  # the digest of the cast tensors
    check = read_header(out)  # the written file is what a user will load: its dtypes and manifest
    written = sorted({t.dtype for t in check.tensors.values()})
    kept = Manifest.from_header(check) == written_manifest and written_manifest.replace(weights_sha256=None) == manifest.replace(weights_sha256=None)
    verification = {"check": "re-read header: dtypes and manifest", "dtypes": written, "manifest_kept": kept}
    return ExportResult(
        "safetensors", str(path), str(out), path.stat().st_size, out.stat().st_size,
        sum(t.numel for t in header.tensors.values()), None, dtype,
        manifest.architecture, manifest.model_kwargs, len(manifest.layers), verification, family=manifest.family,
    )


def build_exportable(path: Path, img_size: int | None = None) -> Built:
    """The factorized model, built in its family's export-friendly form, in fp32, at `img_size` when given."""
    manifest = Manifest.from_header(read_header(path))
    family = get_family(manifest.family) if manifest is not None and manifest.family else get_family("timm")
    with family.exportable():
        built = build_model(path)
    model = built.model.float().eval()
    if img_size is not None and tuple(family.data_config(model).input_size[1:]) != (img_size, img_size):
        if not hasattr(model, "set_input_size"):
            raise LowrankError(f"img_size {img_size}: {type(model).__name__} cannot change its input size after building", param="img_size")
        try:
            model.set_input_size(img_size=img_size)  # resamples position embeddings / window masks
        except Exception as e:  # noqa: BLE001 - timm raises assorted errors for impossible sizes
            raise LowrankError(f"img_size {img_size}: not a valid input size for this model ({e})", param="img_size") from None
    return built


def export_onnx(path: Path, out: Path, *, img_size: int | None = None, opset: int = DEFAULT_OPSET, force: bool = False) -> ExportResult:
    """Export to ONNX, check it, verify it against PyTorch, and only then move it to `out`."""
    _, manifest = require_manifest(path, "export as onnx", need_architecture=True)
    check_output(out, force=force, inputs=(path,))
    check_opset(opset)
    built = build_exportable(path, img_size)
    model, family = built.model, built.family
    written = write_verified_onnx(model, out, input_maker(family, model), family.forward, opset=opset, force=force, inputs=(path,), source=str(path),
                                  max_length=family.max_positions(model))
    size_after = out.stat().st_size + sum(Path(p).stat().st_size for p in written.extra_files)
    n_factorized = sum(isinstance(m, LowRankLinear) for m in model.modules())
    return ExportResult(
        "onnx", str(path), str(out), path.stat().st_size, size_after, count_params(model), _macs(model, family), "float32",
        manifest.architecture, manifest.model_kwargs, n_factorized, written.verification, written.ops, written.extra_files, manifest.family,
    )


def export_checkpoint(
    model: str | os.PathLike | None,
    fmt: str,
    out: str | os.PathLike | None = None,
    *,
    img_size: int | None = None,
    opset: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    runs_dir: str | os.PathLike = RUNS_DIR,
) -> ExportResult:
    """Export a factorized checkpoint (or a run directory's, or the newest run's) as `fmt`."""
    if fmt not in FORMATS:
        raise LowrankError(f"format '{fmt}' is not supported; accepted: {', '.join(FORMATS)}", param="format")
    if dtype is not None:
        parse_dtype(dtype)
    if fmt == "onnx" and dtype not in (None, "float32"):
        raise LowrankError(f"dtype {dtype} is not supported for the onnx format (exports are float32 and verified at 1e-3)", param="dtype")
    path = resolve_model_path(model, runs_dir)
    manifest = Manifest.from_header(read_header(path)) if fmt == "dense" else None
    hub = manifest is not None and manifest.family == "transformers"
    out_path = Path(out) if out is not None else default_output(path, fmt, dtype or "float32", hub)
    if fmt == "onnx":
        return export_onnx(path, out_path, img_size=img_size, opset=DEFAULT_OPSET if opset is None else opset, force=force)
    for name, value in (("img_size", img_size), ("opset", opset)):
        if value is not None:
            raise LowrankError(f"{name} applies to the onnx format only, not {fmt}", param=name)
    if fmt == "dense":
        return export_dense(path, out_path, dtype=dtype, force=force)
    return export_safetensors(path, out_path, dtype=dtype or "float32", force=force)
