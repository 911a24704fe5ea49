"""`lowrank factorize`: a checkpoint in, a factorized checkpoint (with its manifest) out.

1. Check the input (not already factorized) and the output path, before any long work.
2. With an architecture: build the model, load the checkpoint strictly, factorize it in place
   (plain SVD or data-aware with calibration data), and write its state dict. Without one:
   factorize every selected 2-D weight from the file alone, one tensor at a time.
3. Write the result with its manifest, atomically; return what was saved.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lowrank_cli.data.modality import calibration_for
from lowrank_cli.device import resolve_device
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.blockwise import ActivationStore, BlockSource, factorize_block, measure_streamed
from lowrank_cli.factorize.model import allocate_on_bases, check_method, factorize_model
from lowrank_cli.factorize.state_dict import factorize_state_dict
from lowrank_cli.factorize.stream import factorize_streamed, plan_streamed
from lowrank_cli.io.atomic import atomic_folder, check_output, check_output_folder
from lowrank_cli.io.hub import copy_side_files
from lowrank_cli.io.manifest import Manifest, finish_factorized, save_factorized, tied_once
from lowrank_cli.io.safetensors import CheckpointHeader, open_tensors, read_header, read_tensors, shard_bytes, shard_writer
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.measure.memory import resident_bytes
from lowrank_cli.models.build import Built
from lowrank_cli.models.skeleton import hub_skeleton, zero_weights
from lowrank_cli.pipelines.common import build_manifest, output_beside
from lowrank_cli.pipelines.common import with_max_memory
from lowrank_cli.pipelines.common.streamed import Streamed, blockwise_plan, fmt_bytes
from lowrank_cli.pipelines.common.inspection import Inspection, build_or_weight_only, check_calibration, header_params, plan_weight_only
from lowrank_cli.plan.latency import LatencySelection, LayerTimer
from lowrank_cli.plan.select import plan_embeddings, plan_layers, saved_params
from lowrank_cli.recipe import Recipe

Progress = Callable[[str], None]


@dataclass
class FactorizeResult:
    """What `lowrank factorize` wrote and saved."""

    out: Path
    inspection: Inspection
    manifest: Manifest


def with_calibration(recipe: Recipe, calib_data: str | None, calib_samples: int | None) -> Recipe:
    """A copy with the given calibration settings, so that the manifest records what was used."""
    if calib_data is None and calib_samples is None:
        return recipe
    if recipe.factorize.method == "svd" and recipe.factorize.allocation == "uniform":
        given = "calib_data" if calib_data is not None else "calib_samples"
        raise LowrankError(f"{given} has no effect with factorize.method 'svd' and factorize.allocation 'uniform' (plain SVD uses no data); "
                           "set factorize.method to whitened or asvd, or factorize.allocation to sensitivity, in the recipe, "
                           "or leave calibration out", param=given)
    if calib_samples is not None and calib_samples < 1:
        raise LowrankError(f"calib_samples must be at least 1 (got {calib_samples})", param="calib_samples")
    recipe = recipe.model_copy(deep=True)
    update = {k: v for k, v in (("calib_data", None if calib_data is None else str(calib_data)), ("calib_samples", calib_samples)) if v is not None}
    recipe.factorize = recipe.factorize.model_copy(update=update)
    return recipe


def write_factorized(out: Path, tensors: dict, manifest: Manifest, as_folder: bool, folder: Path | None, built, *, force: bool,
                     inputs: tuple, max_bytes: int) -> Manifest:
    """The factorized checkpoint: one file, or a Hub folder (its weights in shards of at most `max_bytes`, and the config
    and tokenizer files the family writes, else those of the input's folder)."""
    if not as_folder:
        return save_factorized(out, tensors, manifest, force=force, inputs=inputs)
    with atomic_folder(out, force=force, inputs=inputs) as tmp:
        with shard_writer(tmp, max_bytes) as writer:
            for key, value in tied_once(tensors).items():
                writer.add(key, value)
            written = finish_factorized(writer, manifest)
        write_folder_files(tmp, folder, built)
    return written


def write_folder_files(tmp: Path, folder: Path | None, built: Built | None) -> None:
    """A factorized Hub folder's files besides its weights: the config and tokenizer files the family writes, else the
    input folder's config.json as it was and its tokenizer and usage files."""
    if built is None or not built.family.write_hub_files(tmp, built.architecture, built.model_kwargs, folder):
        if folder is not None and (folder / "config.json").is_file():
            shutil.copyfile(folder / "config.json", tmp / "config.json")
        copy_side_files(folder, tmp)


def planned_count(model, family, recipe: Recipe) -> int:
    """How many layers (and embedding tables) the recipe factorizes: the progress bar's total."""
    n = sum(p.factorized for p in plan_layers(family.linear_candidates(model), recipe))
    if recipe.factorize.embeddings is not None:
        n += sum(p.factorized for p in plan_embeddings(family.embedding_candidates(model), recipe))
    return n


@dataclass
class Streamable:
    """A checkpoint that streamed factorization takes: its skeleton model (`Built` without weights), and the checkpoint's
    name for each saved tensor."""

    built: Built
    sources: dict[str, str]


def streamable(header: CheckpointHeader, arch: str | None, model_kwargs: dict[str, Any], recipe: Recipe) -> Streamable | None:
    """The skeleton of a Hub folder that can be factorized one tensor (plain SVD) or one block (whitened, ASVD) at a time
    (`models.skeleton.hub_skeleton`), or None where the in-memory path must run: another family, a rank decided across
    layers (budget, sensitivity), latency-aware selection, a data-aware method with embedding tables or layers outside the
    blocks, or tensors the library's own loader would change."""
    f = recipe.factorize
    if f.allocation != "uniform" or f.rank_rule == "budget" or recipe.select.latency_aware:
        return None
    if f.method != "svd" and f.embeddings is not None:
        return None
    found = hub_skeleton(header, arch, model_kwargs)
    if found is None:
        return None
    if f.method != "svd":  # calibrated block by block: every planned layer inside a transformer block
        built = found[0]
        blocks = tuple(f"{name}." for name, _ in built.family.blocks(built.model))
        if not all(p.name.startswith(blocks) for p in plan_streamed(built.model, recipe, built.family) if p.factorized):
            return None
    return Streamable(*found)


def factorize_checkpoint(
    path: str | os.PathLike | None,
    recipe: Recipe,
    out: str | os.PathLike | None = None,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    force: bool = False,
    progress: Callable[[int], Progress] | None = None,
    calib_data: str | None = None,
    calib_samples: int | None = None,
    layer_timer: LayerTimer | None = None,
    seq_len: int | None = None,
    device: str | None = "auto",
    max_shard_size: int | str | None = None,
) -> FactorizeResult:
    """Factorize a checkpoint and write it, with its manifest, to `out` (default `<input>.lowrank.safetensors`; for a
    Hub folder, the folder `<folder>.lowrank` with its config and tokenizer files, unless `out` names a .safetensors file).

    `progress(total)` returns a per-layer callback. `calib_data` (a folder, `digits` or
    `synthetic`) and `calib_samples` override the recipe's calibration settings, which
    `factorize.method: whitened | asvd` needs. With `select.latency_aware`, layers not faster
    factorized (timed by `layer_timer`) stay dense; the manifest records the timings. The SVDs run
    on `device` (`auto`: the GPU when there is one). A folder's weights are written in shards of at most `max_shard_size`
    (bytes, or `"500MB"`; default `"5GB"`), with their index when there are several.

    A transformers Hub folder is streamed (`factorize.stream`) unless ranks are decided across layers (budget,
    sensitivity) or latency-aware: the model is built without its weights, and each tensor is read from the checkpoint's
    files, factorized and written to the output's shards in turn, so that memory holds one weight and its SVD (whitened,
    ASVD: one block, its Grams and the calibration set's hidden states), never the model. The output is the in-memory
    path's, tensor for tensor.
    """
    max_bytes = shard_bytes(max_shard_size)
    svd_dev = resolve_device(device)
    recipe = with_calibration(recipe, calib_data, calib_samples).with_calibration_default()
    method = recipe.factorize.method
    header = read_header(path) if path is not None else None
    if header is not None and Manifest.from_header(header) is not None:
        raise LowrankError(f"{path}: is already factorized (it has a lowrank manifest); factorize the original checkpoint")
    kwargs = dict(model_kwargs or {})
    folder = header.folder if header is not None else None
    as_folder = folder is not None and (out is None or Path(out).suffix != ".safetensors")
    if out is not None:
        out = Path(out)
    elif as_folder:
        out = folder.with_name(folder.name + ".lowrank")
    else:
        out = output_beside(Path(path), ".lowrank.safetensors") if path is not None else Path(f"{arch or recipe.model}.lowrank.safetensors")
    inputs = (path,) if path is not None else ()
    if max_shard_size is not None and not as_folder:
        raise LowrankError(f"max_shard_size applies to a Hub folder's output folder, not to the file {out}", param="max_shard_size")
    # before the (long) SVDs; again atomically at the write
    (check_output_folder if as_folder else check_output)(out, force=force, inputs=inputs)
    check_calibration(recipe)
    if as_folder and (stream := streamable(header, arch, kwargs, recipe)) is not None:
        return _factorize_streamed(stream, path, header, recipe, out, force, inputs, progress, seq_len, svd_dev, max_bytes)
    if as_folder and (blocks := _blockwise(path, header, recipe, arch, kwargs)) is not None:
        return _factorize_blockwise(blocks, path, recipe, out, force, inputs, progress, seq_len, svd_dev, max_bytes)
    limit = recipe.factorize.max_memory_bytes()
    if limit is not None and header is not None and 2 * sum(t.nbytes for t in header.tensors.values()) > limit:
        raise LowrankError(f"factorize.max_memory {recipe.factorize.max_memory} is less than the in-memory factorization of {path} needs "
                           f"(about {fmt_bytes(2 * sum(t.nbytes for t in header.tensors.values()))}); a Hub folder goes one tensor at a time "
                           "with uniform ranks, or one block at a time with factorize.method whitened and ranks allocated across layers, into "
                           "an output folder; raise factorize.max_memory otherwise", param="factorize.max_memory")
    built, why = build_or_weight_only(path, arch, kwargs, recipe)

    if built is None:  # weight-only: from the file alone
        plans, alloc = plan_weight_only(header, recipe, need_spectrum=False)
        with open_tensors(path) as f:
            todo = sum(p.factorized for p in plans)
            tensors = factorize_state_dict(f.get_tensor, plans, list(header.tensors), progress(todo) if progress else None, svd_dev)
        manifest = build_manifest(None, None, {}, plans, recipe, path)
        manifest = write_factorized(out, tensors, manifest, as_folder, folder, None, force=force, inputs=inputs, max_bytes=max_bytes)
        after = sum(t.numel() for t in tensors.values() if t.is_floating_point())
        insp = Inspection(str(path), plans, header_params(header), after, rank_rule=recipe.factorize.rule_label(), allocation=alloc,
                          notes=[f"weight-only: {why}"])
        return FactorizeResult(out, insp, manifest)

    model, family, arch = built.model, built.family, built.architecture
    check_method(recipe, family.task(model))
    before = count_params(model)
    macs = count_macs(model, family.example_at(model, seq_len), family.forward)
    todo = planned_count(model, family, recipe)
    calibration = None
    if method != "svd" or recipe.factorize.allocation == "sensitivity":
        f = recipe.factorize
        calibration = calibration_for(f.calib_data, family, model, built.folder, f.calib_samples, f.calib_batch_size,
                                      recipe.data.max_length, recipe.data.text_field)
    latency = LatencySelection(recipe.select, macs.linear_rows, layer_timer) if recipe.select.latency_aware else None
    result = factorize_model(model, recipe, family=family, progress=progress(todo) if progress else None, calibration=calibration,
                             latency=latency, rows=macs.linear_rows, device=svd_dev)
    timings = latency.to_dict() if latency is not None else None
    manifest = build_manifest(arch, family.name, built.model_kwargs, result.plans, recipe, path, method, timings, result.allocation)
    manifest = write_factorized(out, model.state_dict(), manifest, as_folder, built.folder, built, force=force, inputs=inputs,
                                max_bytes=max_bytes)
    insp = Inspection(
        str(path) if path else None, result.plans, before, count_params(model), architecture=arch, model_kwargs=built.model_kwargs,
        macs_before=macs.macs, macs_after=macs.macs_after(result.plans), rank_rule=recipe.factorize.rule_label(),
        allocation=result.allocation.to_dict() if result.allocation else None, latency=timings,
        architecture_source=built.source, notes=[built.note] if built.note else [], seq_len=family.text_length(model, seq_len),
    )
    return FactorizeResult(out, insp, manifest)


def _factorize_streamed(stream: Streamable, path, header: CheckpointHeader, recipe: Recipe, out: Path, force: bool, inputs: tuple,
                        progress, seq_len: int | None, device, max_bytes: int) -> FactorizeResult:
    """A Hub folder factorized one tensor (plain SVD) or one block (whitened, ASVD) at a time from its files to the output's
    shards (see `factorize_checkpoint`)."""
    built = stream.built
    model, family, arch = built.model, built.family, built.architecture
    check_method(recipe, family.task(model))
    before = count_params(model)
    macs = count_macs(zero_weights(model), family.example_at(model, seq_len), family.forward)  # weights of no memory
    todo = sum(p.factorized for p in plan_streamed(model, recipe, family))
    calibration = None
    if recipe.factorize.method != "svd":
        f = recipe.factorize
        calibration = calibration_for(f.calib_data, family, model, header.folder, f.calib_samples, f.calib_batch_size,
                                      recipe.data.max_length, recipe.data.text_field)
    with atomic_folder(out, force=force, inputs=inputs) as tmp:
        with read_tensors(header) as reader, shard_writer(tmp, max_bytes) as writer:
            result = factorize_streamed(model, recipe, reader.get_tensor, stream.sources, writer.add, family=family,
                                        progress=progress(todo) if progress else None, device=device, calibration=calibration)
            manifest = build_manifest(arch, family.name, built.model_kwargs, result.plans, recipe, path, recipe.factorize.method)
            manifest = finish_factorized(writer, manifest)
        write_folder_files(tmp, header.folder, built)
    insp = Inspection(
        str(path), result.plans, before, before - saved_params(result.plans), architecture=arch, model_kwargs=built.model_kwargs,
        macs_before=macs.macs, macs_after=macs.macs_after(result.plans), rank_rule=recipe.factorize.rule_label(),
        architecture_source=built.source, seq_len=family.text_length(model, seq_len),
    )
    return FactorizeResult(out, insp, manifest)


def _blockwise(path, header: CheckpointHeader, recipe: Recipe, arch: str | None, kwargs: dict[str, Any]) -> Streamed | None:
    """The block-by-block plan for ranks allocated across layers (`allocation: sensitivity`, `rank_rule: budget`) with whitened
    SVD, when the model and its sensitivity pass (about twice its weights) exceed `factorize.max_memory` (or the available
    memory); None otherwise."""
    f = recipe.factorize
    if f.method != "whitened" or (f.allocation != "sensitivity" and f.rank_rule != "budget") or f.embeddings is not None or recipe.select.latency_aware:
        return None
    return blockwise_plan(path, header, recipe, arch, kwargs, 2 * sum(t.nbytes for t in header.tensors.values()), trains=False)


def _factorize_blockwise(s: Streamed, path, recipe: Recipe, out: Path, force: bool, inputs: tuple, progress, seq_len: int | None, device,
                         max_bytes: int) -> FactorizeResult:
    """A Hub folder factorized one block at a time with ranks allocated across layers (docs/algorithms.md §12): the
    measurements block by block, then each block's layers factorized on its calibration inputs and written to the shards."""
    built = s.built
    model, family, arch = built.model, built.family, built.architecture
    check_method(recipe, family.task(model))
    before = count_params(model)
    macs = count_macs(zero_weights(model), family.example_at(model, seq_len), family.forward)  # weights of no memory
    plans = plan_streamed(model, recipe, family)
    f = recipe.factorize
    calibration = calibration_for(f.calib_data, family, model, s.header.folder, f.calib_samples, f.calib_batch_size, recipe.data.max_length,
                                  recipe.data.text_field)
    done = progress(sum(p.factorized for p in plans)) if progress else None
    with atomic_folder(out, force=force, inputs=inputs) as tmp:
        store = ActivationStore(tmp / ".activations", max(0, s.max_memory - resident_bytes() - s.block_need))
        try:
            with read_tensors(s.header) as reader, shard_writer(tmp, max_bytes) as writer:
                src = BlockSource(model, family, reader.get_tensor, s.sources, device)
                sigmas, unit, sens = measure_streamed(src, plans, recipe, calibration, family.task(model), store)
                allocation = allocate_on_bases(plans, recipe, sigmas.__getitem__, sens, unit, macs.linear_rows)
                _write_blocks(src, reader, writer, plans, recipe, calibration, store, done)
                manifest = build_manifest(arch, family.name, built.model_kwargs, plans, recipe, path, f.method, allocation=allocation)
                manifest = finish_factorized(writer, manifest)
        finally:
            store.close()
        write_folder_files(tmp, s.header.folder, built)
    insp = Inspection(
        str(path), plans, before, before - saved_params(plans), architecture=arch, model_kwargs=built.model_kwargs,
        macs_before=macs.macs, macs_after=macs.macs_after(plans), rank_rule=f.rule_label(), allocation=allocation.to_dict(),
        architecture_source=built.source, seq_len=family.text_length(model, seq_len),
        notes=[f"one block at a time: the model and its sensitivity pass need about {fmt_bytes(s.in_memory)}, more than "
               f"{fmt_bytes(s.max_memory)} (factorize.max_memory)"],
    )
    return FactorizeResult(out, insp, manifest)


def _write_blocks(src: BlockSource, reader, writer, plans, recipe: Recipe, calibration, store: ActivationStore, done: Progress | None) -> None:
    """The tensors outside the blocks as stored, then each block's factors at the allocated ranks (whitened on the block's
    calibration inputs, the dense model's)."""
    for key in src.keys:
        if src.outside(key):
            writer.add(key, reader.get_tensor(src.sources[key]))
    hidden, calls, masks = src.first_inputs([b[0] if isinstance(b, (tuple, list)) else b for b in calibration])
    store.put("calib", hidden)
    del hidden
    todo = {p.name: p for p in plans if p.factorized}
    for b in range(len(src)):
        prefix = src.prefix(b)
        student, outs = factorize_block(src.load(b), prefix, todo, recipe, src.device, True, (store.get("calib"), calls, masks))
        store.put("calib", outs)
        for key, value in student.state_dict().items():
            writer.add(prefix + key, value.detach())
        src.drop(b)
        if done is not None:
            for name in todo:
                if name.startswith(prefix):
                    done(name)
