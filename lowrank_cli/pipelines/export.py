"""`lowrank export`: a factorized checkpoint (or a run's student) as a deployable artifact.

- `onnx`: the model built in its family's export-friendly form, exported by the dynamo
  exporter with a dynamic batch axis, checked and verified against PyTorch (`export.onnx`); a causal LM's
  graph takes and returns its KV cache, in the folder optimum's ORTModelForCausalLM loads (`export.onnx_cache`).
- `dense`: every `<layer>.down/up` pair merged back into `<layer>.weight = up · down`: a plain
  state dict that the model's library loads strictly (timm: `create_model(arch, checkpoint_path=...)`),
  or for a transformers model a Hub folder (`from_pretrained`), in the asked dtype.

Every check compares outputs relative to their scale (`export.verify`): max |Δ| ≤ 5e-4 · max |y|
in fp32; in fp16/bf16 3e-2 · max |y| and 99 % of the top-1 predictions kept, a text model's on real text when its
folder has a tokenizer (docs/precision.md).
- `safetensors`: the factorized checkpoint and its manifest, cast to another dtype (16 bits: pairs balanced, checked).
- `hf`: a transformers model as a Hub folder that stock transformers loads without lowrank (`trust_remote_code=True`),
  the factors kept (`export.hf`), with the tokenizer and usage files and a model card (`export.hf_card`).

Every output is written to a temporary file and renamed into place only when it is complete
and verified, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.data.text import has_tokenizer, tokenizer_of
from lowrank_cli.errors import LowrankError
from lowrank_cli.export.cast import cast_factorized, cast_tensors, dtype_name, parse_dtype
from lowrank_cli.export.dense import merge_state_dict
from lowrank_cli.export.hf import (hf_classes, hf_config, hub_id, load_folder, modeling_source, require_clean_load, require_transformers,
                                   require_written_tensors, write_folder)
from lowrank_cli.export.hf_card import CardFacts, dense_params, model_card, run_report
from lowrank_cli.export.onnx import DEFAULT_OPSET, check_opset, write_verified_onnx
from lowrank_cli.export.onnx_cache import MODEL_FILE, write_verified_decoder
from lowrank_cli.export.precision import require_representable, text_inputs
from lowrank_cli.export.verify import LOW_PRECISION, compare_outputs, require_match
from lowrank_cli.io.atomic import atomic_folder, atomic_output, check_output, check_output_folder
from lowrank_cli.io.hub import copy_side_files
from lowrank_cli.io.manifest import Manifest, read_checkpoint, save_factorized
from lowrank_cli.io.safetensors import checkpoint_files, read_header, save_checkpoint, shard_bytes
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.models.build import DEFAULT_FAMILY, Built, build_model, load_state_dict_strict
from lowrank_cli.models.family import ModelFamily, fill_tied, get_family
from lowrank_cli.nn.lowrank import LowRankLinear
from lowrank_cli.pipelines.common import RUNS_DIR, output_beside, require_manifest, resolve_model_path

FORMATS = ("onnx", "dense", "safetensors", "hf")
def check_shard_size(size: int | str | None) -> None:
    """A positive number of bytes, or digits and a unit (`500MB`, `2GB`, `1GiB`); else a LowrankError naming it."""
    if size is not None:
        shard_bytes(size)


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
    verification: dict[str, Any] | None = None  # what was checked: max_abs_diff, scale, relative_diff, tolerance, top1_agreement
    onnx_ops: dict[str, int] | None = None  # MatMul / Gemm node counts of an ONNX export
    extra_files: list[str] = field(default_factory=list)  # e.g. the ONNX external data file
    family: str | None = None
    weight_files: list[str] = field(default_factory=list)  # a Hub folder's weight files: model.safetensors, or its shards
    usage: str | None = None  # how to load the export, when that is not the family's own loader (format hf)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_output(path: Path, fmt: str, dtype: str, hub: bool = False) -> Path:
    """`<stem>.onnx`, `<stem>.dense.safetensors` or `<stem>.<dtype>.safetensors` beside the input; for a transformers
    model's dense export, the Hub folder `<folder>.dense` (named after the checkpoint's folder when it has one); `hf`: the
    Hub folder `<folder>.hf`."""
    if hub or fmt == "hf":
        base = path.parent if path.name in ("model.safetensors", "student.safetensors") and (path.parent / "config.json").is_file() else path
        return output_beside(base, ".hf" if fmt == "hf" else ".dense")
    return output_beside(path, {"onnx": ".onnx", "dense": ".dense.safetensors", "safetensors": f".{dtype}.safetensors"}[fmt])


TEXT_LENGTHS = {1: 7, 2: 12, 3: 19}  # tokens per example of a text model's export sample (batch 2) and its two checks


def input_maker(family: ModelFamily, model: nn.Module):
    """(batch, generator) → random inputs: images of the model's size, or text whose length changes with the batch."""
    limit = family.max_positions(model)
    if limit is None:
        return lambda b, g: family.example_inputs(model, b, generator=g)
    return lambda b, g: family.example_inputs(model, b, generator=g, seq_len=min(TEXT_LENGTHS.get(b, 16), limit))


VERIFY_BATCH = {"image": 8, "text": 2}  # examples a dense export is checked on (text: 2 × up to 128 tokens)
HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@torch.no_grad()
def _compare(family: ModelFamily, reference: nn.Module, exported: nn.Module, low_precision: bool, seed: int = 0,
             folder: Path | None = None) -> dict[str, Any]:
    """`export.verify.compare_outputs` of `exported` against `reference` (both fp32) on random inputs; `inputs` says which.

    A 16-bit copy of a text model whose `folder` holds its tokenizer is compared on real text instead
    (`export.precision.text_inputs`): on random token ids a causal LM puts partial attention sinks on a few positions,
    where any rounding is amplified some tenfold (the original SmolLM2-135M rounded to bf16 failed 1 of 12 random draws,
    no text; docs/precision.md)."""
    batch = VERIFY_BATCH["text" if family.max_positions(reference) is not None else "image"]
    x = family.example_inputs(reference, batch, generator=torch.Generator().manual_seed(seed))
    inputs = "random"
    if low_precision and has_tokenizer(folder):
        text = text_inputs(x, tokenizer_of(folder), seed)
        x, inputs = (text, "text") if text is not None else (x, inputs)
    compared = compare_outputs([(family.forward(exported, x), family.forward(reference, x))], low_precision=low_precision)
    return {**compared, "inputs": inputs}


def _low_precision(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether any floating-point tensor is float16 / bfloat16: the export is checked at the low-precision tolerance."""
    return any(v.dtype in LOW_PRECISION for v in tensors.values())


def _macs(built_model: nn.Module, family: ModelFamily) -> int:
    return count_macs(built_model, family.example_inputs(built_model), family.forward).macs


def exports_folder(manifest: Manifest) -> bool:
    """Whether the dense export of this factorized checkpoint is its library's own folder (a Hub folder), by its family."""
    return manifest.family is not None and get_family(manifest.family).dense_export_is_folder()


def export_dense(path: Path, out: Path, *, dtype: str | None = None, force: bool = False,
                 max_shard_size: int | str | None = None) -> ExportResult:
    """Merge every factorized layer back to one dense weight and write a plain state dict, in `dtype` when given.

    With an architecture, the result is loaded strictly into the family's freshly built model
    and its outputs compared with the factorized model's (the verification in the report); an
    export that fails the check is not written. A transformers model becomes a Hub folder
    (`export_dense_hub`, shards of at most `max_shard_size`).
    """
    header, manifest = require_manifest(path, "export as dense", need_architecture=False)
    if exports_folder(manifest):
        return export_dense_hub(path, out, header, manifest, dtype=dtype, force=force, max_shard_size=max_shard_size)
    if max_shard_size is not None:
        raise LowrankError(f"max_shard_size applies to a transformers model's dense export (a Hub folder), not to {path}", param="max_shard_size")
    check_output(out, force=force, inputs=(path,))
    cast = parse_dtype(dtype) if dtype else None
    dense_sd = _merged(path, manifest, cast)
    params, macs, verification = None, None, None
    if not manifest.weight_only:
        factorized = build_model(path)
        family = factorized.family
        dense = family.create(manifest.architecture, manifest.model_kwargs).eval()
        dense_sd = cast_tensors(fill_tied(dense, dense_sd), cast)  # a tied tensor stored once: the library's strict load wants each name
        load_state_dict_strict(dense, dense_sd, out, manifest.architecture)  # exactly what the library's strict load will see
        dense.float()
        verification = {"check": f"strict load into a new {family.name} model; outputs (in fp32) vs the factorized model",
                        **_compare(family, factorized.model.float(), dense, _low_precision(dense_sd))}
        require_match(verification, f"the dense export of {path}", "the factorized model")
        params, macs = count_params(dense), _macs(dense, family)
    else:
        dense_sd = cast_tensors(dense_sd, cast)
    if params is None:
        params = sum(v.numel() for v in dense_sd.values() if v.is_floating_point())
    save_checkpoint(out, dense_sd, None, force=force, inputs=(path,))
    return ExportResult(
        "dense", str(path), str(out), path.stat().st_size, out.stat().st_size, params, macs, dtype_name(dense_sd),
        manifest.architecture, manifest.model_kwargs, len(manifest.layers), verification, family=manifest.family,
    )


def export_dense_hub(path: Path, out: Path, header, manifest: Manifest, *, dtype: str | None = None, force: bool = False,
                     max_shard_size: int | str | None = None) -> ExportResult:
    """A transformers model's dense export (a family whose dense export is a folder): a Hub folder (config, merged weights in `dtype`, tokenizer and usage files)
    that its class's `from_pretrained` loads, in that dtype, with no missing or unexpected keys; its outputs (in fp32)
    checked against the factorized model's. `max_shard_size` (bytes, or `"5GB"`): `save_pretrained`'s shards."""
    check_output_folder(out, force=force, inputs=(path,))
    cast = parse_dtype(dtype) if dtype else None
    factorized = build_model(path)
    family, model = factorized.family, factorized.model
    dense_sd = cast_tensors(_merged(path, manifest, cast), cast)
    low_precision = _low_precision(dense_sd)
    merged = family.create(manifest.architecture, manifest.model_kwargs)
    load_state_dict_strict(merged, dense_sd, path, manifest.architecture)
    if cast is not None:
        merged.to(cast)  # the weights saved, and the config's dtype, are the asked ones
    with atomic_folder(out, force=force, inputs=(path,)) as tmp:
        family.save_dense(merged, tmp, max_shard_size)  # the library's own format (its key names, tied weights saved once, shards)
        copy_side_files(header.folder, tmp)
        written_header = read_header(tmp)
        written = sorted({HEADER_DTYPES.get(t.dtype, t.dtype) for t in written_header.tensors.values() if t.dtype in HEADER_DTYPES})
        if cast is not None and written != [dtype]:
            raise LowrankError(f"the dense export of {path} holds {'+'.join(written)} tensors, not the {dtype} asked; nothing was written")
        dense = family.load_dense(tmp, manifest.architecture, dtype=cast)  # and its own loader, strict, in that dtype
        loaded = sorted({str(p.dtype).removeprefix("torch.") for p in dense.parameters()})
        dense.float()
        verification = {"check": f"{manifest.architecture}.from_pretrained of the folder{f' in {dtype}' if cast else ''}: no missing or "
                                 "unexpected keys; outputs (in fp32) vs the factorized model",
                        **_compare(family, model.float(), dense, low_precision, folder=header.folder), "loaded_dtypes": loaded}
        require_match(verification, f"the dense export of {path}", "the factorized model")
        params, macs = count_params(dense), _macs(dense, family)
        files = sorted(f.name for f in checkpoint_files(tmp)[1])
        bytes_after = sum((tmp / f).stat().st_size for f in files)
    return ExportResult(
        "dense", str(path), str(out), sum(f.stat().st_size for f in checkpoint_files(path)[1]), bytes_after,
        params, macs, "+".join(written), manifest.architecture, {}, len(manifest.layers), verification,
        family=manifest.family, weight_files=files,
    )


def _merged(path: Path, manifest: Manifest, cast: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The checkpoint's merged state dict, products computed in fp32 and rounded once to `cast` (when given); a product
    beyond float16's range is refused in one line (`export.precision.require_representable`)."""
    low = cast in LOW_PRECISION
    dense_sd = merge_state_dict(read_checkpoint(path)[2], manifest.layers, torch.float32 if low else cast)
    if low:
        require_representable(dense_sd, cast, f"the dense export of {path}")
    return cast_tensors(dense_sd, cast)


def export_safetensors(path: Path, out: Path, *, dtype: str = "float32", force: bool = False) -> ExportResult:
    """The factorized checkpoint with its manifest, every floating-point tensor cast to `dtype` (`export.cast.cast_factorized`:
    to 16 bits, each pair balanced first). A 16-bit copy of a checkpoint with an architecture is built from the written
    file and its outputs (in fp32) compared with the factorized model's (`export.verify`) before it is moved into place."""
    header, manifest = require_manifest(path, "export as safetensors", need_architecture=False)
    check_output(out, force=force, inputs=(path,))
    cast = parse_dtype(dtype)
    tensors = cast_factorized(read_checkpoint(path)[2], manifest.layers, cast)
    with atomic_output(out, force=force, inputs=(path,)) as tmp:
        written_manifest = save_factorized(tmp, tensors, manifest, force=True, inputs=(path,))  # the digest of the cast tensors
        check = read_header(tmp)  # the written file is what a user will load: its dtypes and manifest
        written = sorted({t.dtype for t in check.tensors.values()})
        kept = (Manifest.from_header(check) == written_manifest
                and written_manifest.replace(weights_sha256=None) == manifest.replace(weights_sha256=None))
        verification = {"check": "re-read header: dtypes and manifest", "dtypes": written, "manifest_kept": kept}
        if cast in LOW_PRECISION and not manifest.weight_only:
            factorized, copy = build_model(path), build_model(tmp)
            verification = {**verification, "check": f"re-read header: dtypes and manifest; the file built in {dtype}, outputs "
                                                     "(in fp32) vs the factorized model",
                            **_compare(factorized.family, factorized.model.float(), copy.model.float(), True, folder=header.folder)}
            require_match(verification, f"the {dtype} copy of {path}", "the factorized model")
    return ExportResult(
        "safetensors", str(path), str(out), path.stat().st_size, out.stat().st_size,
        sum(t.numel for t in header.tensors.values()), None, dtype,
        manifest.architecture, manifest.model_kwargs, len(manifest.layers), verification, family=manifest.family,
    )


def export_hf(path: Path, out: Path, *, dtype: str | None = None, force: bool = False, base_model: str | None = None,
              command: str | None = None) -> ExportResult:
    """A transformers model as a Hub folder that stock transformers loads without lowrank (`trust_remote_code=True`), at its
    factorized size: the factors in `dtype` (through `export.cast.cast_factorized`), `config.json` with its `auto_map`,
    `modeling_lowrank.py`, the tokenizer and usage files (sentence-transformers' pooling among them) and a model card
    (`base_model`: a Hub id for its front matter; `command`: the command it names as the one that made it).

    Before the folder is moved into place, transformers' own `from_pretrained(..., trust_remote_code=True)` loads it:
    no missing, unexpected or mismatched key, every tensor the one written, the factorized model's parameter count, and
    outputs (in fp32) within the export tolerance of the factorized model's (`export.verify`)."""
    header, manifest = require_manifest(path, "export as hf", need_architecture=True)
    require_transformers(path, manifest)
    check_output_folder(out, force=force, inputs=(path,))
    if base_model is not None and hub_id(base_model) is None:
        raise LowrankError(f"base_model '{base_model}' is not a Hub repository id; accepted: owner/name", param="base_model")
    factorized = build_model(path)
    family, model = factorized.family, factorized.model
    classes = hf_classes(model)
    tensors = cast_factorized(read_checkpoint(path)[2], manifest.layers, parse_dtype(dtype) if dtype else None)
    if "+" in dtype_name(tensors):  # several dtypes: one for from_pretrained's dtype="auto" to load them in
        tensors = cast_factorized(tensors, manifest.layers, torch.float32)
    written, params = dtype_name(tensors), count_params(model)
    what = f"the hf export of {path}"
    with atomic_folder(out, force=force, inputs=(path,)) as tmp:
        files = write_folder(tmp, modeling_source(classes), hf_config(manifest.model_kwargs, manifest.layers, classes, written), tensors)
        copy_side_files(header.folder, tmp)
        facts = CardFacts(title=out.name, architecture=manifest.architecture, auto_class=classes.main_auto(), task=family.task(model).name,
                          layers=manifest.layers, params=(dense_params(params, manifest.layers), params), dtype=written,
                          command=command or hf_command(path, out, dtype, base_model), base_model=base_model, source=manifest.source,
                          recipe=manifest.recipe, distill=manifest.distill, report=run_report(path),
                          sentence_transformers=(tmp / "modules.json").is_file())
        (tmp / "README.md").write_text(model_card(facts), encoding="utf-8")
        loaded, info = load_folder(tmp, classes.main_auto())
        require_clean_load(info, what)
        require_written_tensors(loaded, tensors, what)
        if count_params(loaded) != params:
            raise LowrankError(f"{what}: loads with {count_params(loaded):,} parameters, not the factorized model's {params:,}; "
                               "nothing was written")
        loaded_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in loaded.parameters()})
        verification = {"check": f"{classes.main_auto()}.from_pretrained(trust_remote_code=True) of the folder: no missing or unexpected "
                                 "keys, every tensor the one written; outputs (in fp32) vs the factorized model",
                        **_compare(family, model.float(), loaded.float(), _low_precision(tensors), folder=header.folder),
                        "loaded_dtypes": loaded_dtypes}
        require_match(verification, what, "the factorized model")
        bytes_after = sum((tmp / f).stat().st_size for f in files if f.endswith(".safetensors"))
    macs = _macs(model, family)  # the loaded model's layers are the factorized model's; the family reads the config's model_type
    return ExportResult(
        "hf", str(path), str(out), sum(f.stat().st_size for f in checkpoint_files(path)[1]), bytes_after, params, macs, written,
        manifest.architecture, {}, len(manifest.layers), verification, family=manifest.family,
        weight_files=[f for f in files if f.endswith(".safetensors")],
        usage=f"load with transformers.{classes.main_auto()}.from_pretrained('{out}', trust_remote_code=True)",
    )


def build_exportable(path: Path, img_size: int | None = None) -> Built:
    """The factorized model, built in its family's export-friendly form, in fp32, at `img_size` when given."""
    manifest = Manifest.from_header(read_header(path))
    family = get_family(manifest.family if manifest is not None and manifest.family else DEFAULT_FAMILY)
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


def export_onnx(path: Path, out: Path | None, *, img_size: int | None = None, opset: int = DEFAULT_OPSET, force: bool = False,
                kv_cache: bool | None = None) -> ExportResult:
    """Export to ONNX, check it, verify it against PyTorch, and only then move it to `out` (None: beside the input).

    A model that generates text (a causal LM) gets, unless `kv_cache` is False (or unset with `out` a `.onnx` file), the
    graph with a KV cache that generation needs, in the folder optimum's ORTModelForCausalLM loads (`export_onnx_decoder`);
    every other model, or a causal LM without the cache, one `.onnx` file. `kv_cache=True` is refused for a model that
    does not generate."""
    header, manifest = require_manifest(path, "export as onnx", need_architecture=True)
    check_opset(opset)
    if out is not None and kv_cache is None and out.suffix == ".onnx":
        kv_cache = False  # a .onnx file asked for: the single graph without a cache, as before the KV-cache export
    if out is not None:  # before the model is built: an existing output is refused at once
        (check_output if kv_cache is False or out.suffix == ".onnx" else check_output_folder)(out, force=force, inputs=(path,))
    built = build_exportable(path, img_size)
    model, family = built.model, built.family
    task = family.task(model)
    if kv_cache and not task.language_model:
        raise LowrankError(f"kv_cache: {path} holds a {task.name} model ({manifest.architecture}), which does not generate text; "
                           "a KV cache is exported for causal LMs only (accepted here: kv_cache false or unset)", param="kv_cache")
    if task.language_model and kv_cache is not False:
        return export_onnx_decoder(path, out, built, header, manifest, opset=opset, force=force)
    out = out if out is not None else default_output(path, "onnx", "float32")
    check_output(out, force=force, inputs=(path,))
    written = write_verified_onnx(model, out, input_maker(family, model), family.forward, opset=opset, force=force, inputs=(path,), source=str(path),
                                  max_length=family.max_positions(model))
    size_after = out.stat().st_size + sum(Path(p).stat().st_size for p in written.extra_files)
    n_factorized = sum(isinstance(m, LowRankLinear) for m in model.modules())
    return ExportResult(
        "onnx", str(path), str(out), path.stat().st_size, size_after, count_params(model), _macs(model, family), "float32",
        manifest.architecture, manifest.model_kwargs, n_factorized, written.verification, written.ops, written.extra_files, manifest.family,
    )


def decoder_folder(path: Path) -> Path:
    """The default folder of a causal LM's ONNX export with a KV cache: `<folder>-onnx` beside the checkpoint's Hub folder
    (or `<stem>-onnx` beside a checkpoint file)."""
    base = path.parent if path.name in ("model.safetensors", "student.safetensors") and (path.parent / "config.json").is_file() else path
    return output_beside(base, "-onnx")


def export_onnx_decoder(path: Path, out: Path | None, built: Built, header, manifest: Manifest, *, opset: int = DEFAULT_OPSET,
                        force: bool = False) -> ExportResult:
    """A causal LM's ONNX export with a KV cache (`export.onnx_cache`): the folder `out` (default `decoder_folder`) holding
    `model.onnx` (inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/.value`; outputs `logits`,
    `present.{i}.key/.value`), `config.json`, `generation_config.json` and the tokenizer and usage files, which
    `ORTModelForCausalLM.from_pretrained(out)` loads; written only once its logits and its greedy generation match PyTorch's."""
    out = out if out is not None else decoder_folder(path)
    if out.suffix == ".onnx":
        raise LowrankError(f"out {out}: a causal LM's ONNX export with a KV cache is a folder (model.onnx, config.json, the tokenizer) that "
                           "ORTModelForCausalLM.from_pretrained loads, not a .onnx file; accepted: a folder name, or kv_cache false "
                           "for one .onnx file without a cache", param="out")
    check_output_folder(out, force=force, inputs=(path,))
    model, family = built.model, built.family
    with atomic_folder(out, force=force, inputs=(path,)) as tmp:
        written = write_verified_decoder(model, tmp, input_maker(family, model), family.forward, opset=opset, source=str(path),
                                         max_length=family.max_positions(model))
        family.write_hub_files(tmp, manifest.architecture, manifest.model_kwargs, header.folder)  # config.json, tokenizer, usage files
        files = [MODEL_FILE, *written.extra_files]
        size_after = sum((tmp / f).stat().st_size for f in files)
    n_factorized = sum(isinstance(m, LowRankLinear) for m in model.modules())
    return ExportResult(
        "onnx", str(path), str(out), path.stat().st_size, size_after, count_params(model), _macs(model, family), "float32",
        manifest.architecture, manifest.model_kwargs, n_factorized, written.verification, written.ops, [], manifest.family, weight_files=files,
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
    max_shard_size: int | str | None = None,
    kv_cache: bool | None = None,
) -> ExportResult:
    """Export a factorized checkpoint (or a run directory's, or the newest run's) as `fmt`. `max_shard_size`: a
    transformers model's dense export is written in shards of at most that many bytes (an int, or `"500MB"`). `kv_cache`
    (onnx): a causal LM's graph with a KV cache, in a folder (None: for every model that generates; see `export_onnx`)."""
    if fmt not in FORMATS:
        raise LowrankError(f"format '{fmt}' is not supported; accepted: {', '.join(FORMATS)}", param="format")
    if dtype is not None:
        parse_dtype(dtype)
    if fmt == "onnx" and dtype not in (None, "float32"):
        raise LowrankError(f"dtype {dtype} is not supported for the onnx format (exports are float32); accepted: float32", param="dtype")
    check_shard_size(max_shard_size)
    if max_shard_size is not None and fmt != "dense":
        raise LowrankError(f"max_shard_size applies to the dense format only, not {fmt}", param="max_shard_size")
    path = resolve_model_path(model, runs_dir)
    manifest = Manifest.from_header(read_header(path)) if fmt == "dense" else None
    hub = manifest is not None and exports_folder(manifest)
    out_path = Path(out) if out is not None else default_output(path, fmt, dtype or "float32", hub)
    if fmt == "onnx":
        return export_onnx(path, Path(out) if out is not None else None, img_size=img_size, opset=DEFAULT_OPSET if opset is None else opset,
                           force=force, kv_cache=kv_cache)
    for name, value in (("img_size", img_size), ("opset", opset), ("kv_cache", kv_cache)):
        if value is not None:
            raise LowrankError(f"{name} applies to the onnx format only, not {fmt}", param=name)
    if fmt == "dense":
        return export_dense(path, out_path, dtype=dtype, force=force, max_shard_size=max_shard_size)
    if fmt == "hf":
        return export_hf(path, out_path, dtype=dtype, force=force, command=hf_command(model, out, dtype))
    return export_safetensors(path, out_path, dtype=dtype or "float32", force=force)


def hf_command(model: str | os.PathLike | None, out: str | os.PathLike | None, dtype: str | None, base_model: str | None = None) -> str:
    """The `lowrank export` command line of an hf export, for its model card: paths by their names only (a card is published)."""
    name = lambda p: Path(p).name if p is not None else None  # noqa: E731
    args = ["lowrank", "export"] + ([name(model)] if model is not None else []) + ["--format", "hf"]
    for flag, value in (("--out", name(out)), ("--dtype", dtype), ("--base-model", base_model)):
        args += [flag, str(value)] if value is not None else []
    return shlex.join(args)


def export_hf_checkpoint(model: str | os.PathLike | None, out: str | os.PathLike | None = None, *, dtype: str | None = None,
                         force: bool = False, base_model: str | None = None, runs_dir: str | os.PathLike = RUNS_DIR) -> ExportResult:
    """`export_checkpoint(model, "hf", out, dtype=, force=)` with `base_model`, a Hub id, named in the model card's front matter."""
    if dtype is not None:
        parse_dtype(dtype)
    path = resolve_model_path(model, runs_dir)
    out_path = Path(out) if out is not None else default_output(path, "hf", dtype or "float32")
    return export_hf(path, out_path, dtype=dtype, force=force, base_model=base_model, command=hf_command(model, out, dtype, base_model))
