"""The file-level steps of the pipeline: inspect a checkpoint, factorize it to a new file.

Each returns plain data (dicts / dataclasses) that `report.py` renders and `--json` prints.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowrank_cli import __version__
from lowrank_cli.budget import allocate_for_model, allocate_ranks
from lowrank_cli.calibrate import calibration_batches
from lowrank_cli.checkpoint import FORMAT_VERSION, CheckpointHeader, open_tensors, read_header, save_checkpoint, sha256_file
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize import factorize_model, factorize_state_dict, manifest_layers
from lowrank_cli.flops import count_macs, count_params
from lowrank_cli.latency import LatencySelection, LayerTimer
from lowrank_cli.models import build_model, model_kwargs_of
from lowrank_cli.recipe import Recipe
from lowrank_cli.select import LayerPlan, linear_candidates, plan_layers, weight_candidates

Progress = Callable[[str], None]


@dataclass
class Inspection:
    """What `lowrank inspect` found. MACs are None without an architecture."""

    checkpoint: str | None
    architecture: str | None
    model_kwargs: dict[str, Any]
    factorized_checkpoint: bool
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    layers: list[LayerPlan]
    tensors: list[dict[str, Any]] = field(default_factory=list)
    rank_rule: str = ""
    allocation: dict[str, Any] | None = None  # rank_rule budget: budget.Allocation.to_dict()
    latency: dict[str, Any] | None = None  # select.latency_aware: latency.LatencySelection.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "architecture": self.architecture,
            "model_kwargs": self.model_kwargs,
            "factorized_checkpoint": self.factorized_checkpoint,
            "rank_rule": self.rank_rule,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "layers": [p.to_dict() for p in self.layers],
            "tensors": self.tensors,
            "allocation": self.allocation,
            "latency": self.latency,
        }


def _rule_label(recipe: Recipe) -> str:
    return recipe.factorize.rule_label()


def _tensor_rows(header: CheckpointHeader | None, model: nn.Module | None) -> list[dict[str, Any]]:
    if header is not None:
        return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "params": t.numel} for t in header.tensors.values()]
    assert model is not None
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "params": v.numel()} for k, v in model.state_dict().items()]


def _spectrum_from_model(model: nn.Module) -> Callable[[str], torch.Tensor]:
    return lambda name: torch.linalg.svdvals(model.get_submodule(name).weight.detach().float())


def inspect_checkpoint(
    path: str | os.PathLike | None,
    recipe: Recipe,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    spectrum: bool = False,
    layer_timer: LayerTimer | None = None,
) -> Inspection:
    """Inspect a checkpoint (or an architecture with random weights when `path` is None).

    Without an architecture only the header is read (lazily); with one, the model is built,
    the checkpoint loaded strictly and MACs counted before and after factorization.
    `spectrum` computes each candidate's singular values to report the energy kept.
    With `select.latency_aware`, each planned layer is timed (`layer_timer`, default
    `bench.time_linear_layers`) and those not faster factorized stay dense.
    """
    header = read_header(path) if path is not None else None
    manifest = header.manifest if header is not None else None
    arch = arch or (manifest or {}).get("architecture") or recipe.model
    kwargs = {**recipe.model_kwargs, **(model_kwargs or {})}
    needs_spectrum = spectrum or recipe.factorize.rank_rule in ("energy", "budget")
    budget = recipe.factorize.rank_rule == "budget"  # allocated on σ(W): inspect has no calibration data

    if manifest is not None:
        return _inspect_factorized(path, header, manifest, arch, kwargs)

    if arch is None:  # weight-only: the header is all we read, plus one weight at a time for spectra
        _no_latency_without_arch(recipe, path)
        with contextlib.ExitStack() as stack:
            spec = None
            if needs_spectrum:
                f = stack.enter_context(open_tensors(path))
                spec = functools.cache(lambda name: torch.linalg.svdvals(f.get_tensor(f"{name}.weight").float()))
            plans = plan_layers(weight_candidates(header), recipe, spec)
            alloc = allocate_ranks(plans, spec, recipe.factorize.min_rank).to_dict() if budget else None
        before = sum(t.numel for t in header.tensors.values() if t.dtype in {"F64", "F32", "F16", "BF16"})
        return Inspection(str(path), None, {}, False, before, before - _saved(plans), None, None, plans, _tensor_rows(header, None), _rule_label(recipe), alloc)

    model, _ = build_model(path, arch, kwargs)
    spec = functools.cache(_spectrum_from_model(model)) if needs_spectrum else None
    plans = plan_layers(linear_candidates(model), recipe, spec)
    alloc = allocate_for_model(model, plans, recipe, spec).to_dict() if budget else None
    before = count_params(model)
    macs = count_macs(model)
    latency = None
    if recipe.select.latency_aware:
        sel = LatencySelection(recipe.select, macs.linear_rows, layer_timer)
        sel.decide(plans)
        latency = sel.to_dict()
    return Inspection(
        str(path) if path else None, arch, model_kwargs_of(model, kwargs), False,
        before, before - _saved(plans), macs.macs, macs.macs_after(plans), plans, _tensor_rows(header, model), _rule_label(recipe), alloc,
        latency,
    )


def _no_latency_without_arch(recipe: Recipe, path) -> None:
    if recipe.select.latency_aware:
        raise LowrankError(
            f"{path}: select.latency_aware needs an architecture to know each layer's token count; "
            "pass --model ARCH (or set 'model:' in the recipe), or turn latency_aware off"
        )


def _saved(plans: list[LayerPlan]) -> int:
    return sum(p.params_before - p.params_after for p in plans)


def _inspect_factorized(path, header: CheckpointHeader, manifest: dict, arch: str | None, kwargs: dict) -> Inspection:
    """A checkpoint written by `factorize`: report the ranks it was factorized with."""
    layers = manifest["layers"]
    latency = manifest.get("latency")  # written by a latency-aware factorize: timings and decisions
    timed = (latency or {}).get("layers", {})
    plans = [
        LayerPlan(name, e["d_in"], e["d_out"], e["bias"], True, e["rank"], e.get("rule"), None, latency=timed.get(name))
        for name, e in layers.items()
    ]
    rule = (manifest.get("recipe") or {}).get("factorize", {}).get("rank_rule", "")
    if manifest.get("architecture") is None:
        after = sum(t.numel for t in header.tensors.values() if t.dtype in {"F64", "F32", "F16", "BF16"})
        return Inspection(str(path), None, {}, True, after + _saved(plans), after, None, None, plans, _tensor_rows(header, None), rule, latency=latency)
    model, _ = build_model(path, arch, kwargs)
    dense = [
        LayerPlan(c.name, c.d_in, c.d_out, c.bias, False, None, None,
                  (timed.get(c.name) or {}).get("reason") or c.skip or "left dense when factorized", latency=timed.get(c.name))
        for c in linear_candidates(model)
    ]
    after = count_params(model)
    macs = count_macs(model)
    macs_before = macs.macs + sum(macs.linear_rows.get(f"{p.name}.down", 0) * p.macs_per_token_saved for p in plans)
    return Inspection(
        str(path), manifest["architecture"], manifest.get("model_kwargs", {}), True,
        after + _saved(plans), after, macs_before, macs.macs, plans + dense, _tensor_rows(header, None), rule, latency=latency,
    )


@dataclass
class FactorizeResult:
    """What `lowrank factorize` wrote and saved."""

    out: Path
    inspection: Inspection
    manifest: dict[str, Any]


def _with_calibration(recipe: Recipe, calib_data: str | None, calib_samples: int | None) -> Recipe:
    """A copy with the command line's calibration settings, so the manifest records what was used."""
    if calib_data is None and calib_samples is None:
        return recipe
    if calib_samples is not None and calib_samples < 1:
        raise LowrankError(f"--calib-samples must be at least 1 (got {calib_samples})")
    recipe = recipe.model_copy(deep=True)
    update = {k: v for k, v in (("calib_data", None if calib_data is None else str(calib_data)), ("calib_samples", calib_samples)) if v is not None}
    recipe.factorize = recipe.factorize.model_copy(update=update)
    return recipe


def default_output(path: str | os.PathLike | None, arch: str | None) -> Path:
    """`<stem>.lowrank.safetensors` beside the input, or `<arch>.lowrank.safetensors` here."""
    if path is not None:
        p = Path(path)
        return p.with_name(f"{p.name.removesuffix('.safetensors')}.lowrank.safetensors")
    return Path(f"{arch}.lowrank.safetensors")


def build_manifest(
    arch: str | None, model_kwargs: dict[str, Any], plans: list[LayerPlan], recipe: Recipe, source: str | os.PathLike | None,
    method: str = "svd", latency: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `lowrank` manifest stored in a factorized checkpoint's metadata (with `latency` when latency-aware)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "lowrank_version": __version__,
        "architecture": arch,
        "model_kwargs": model_kwargs,
        "layers": manifest_layers(plans, method),
        "recipe": recipe.to_dict(),
        "source": None if source is None else {"file": Path(source).name, "sha256": sha256_file(source)},
    }
    if latency is not None:
        manifest["latency"] = latency
    return manifest


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
) -> FactorizeResult:
    """Factorize a checkpoint by truncated SVD and write it, with its manifest, to `out`.

    With an architecture (`arch` or the recipe's `model`), the timm model is built, loaded
    strictly and factorized module by module; without one, every selected 2-D weight is
    factorized from the file alone. `progress(total)` returns a per-layer callback.
    `calib_data` (a folder, `digits` or `synthetic`) and `calib_samples` override the
    recipe's calibration settings, which `factorize.method: whitened | asvd` needs.
    With `select.latency_aware`, layers not faster factorized (timed by `layer_timer`,
    default `bench.time_linear_layers`) stay dense; the manifest records the timings.
    """
    recipe = _with_calibration(recipe, calib_data, calib_samples)
    method = recipe.factorize.method
    header = read_header(path) if path is not None else None
    if header is not None and header.manifest is not None:
        raise LowrankError(f"{path}: is already factorized (it has a lowrank manifest); factorize the original checkpoint")
    arch = arch or recipe.model
    kwargs = {**recipe.model_kwargs, **(model_kwargs or {})}
    out = Path(out) if out is not None else default_output(path, arch)
    inputs = (path,) if path is not None else ()
    if out.exists() and not force:  # fail before the (long) SVDs, and again atomically at the write
        raise LowrankError(f"{out}: already exists; pass --force to overwrite it")
    if path is not None and out.exists() and out.resolve() == Path(path).resolve():
        raise LowrankError(f"{out}: refusing to overwrite the input checkpoint; choose another --out")

    if method != "svd" and arch is None:
        raise LowrankError(f"factorize.method '{method}' needs an architecture to run calibration data through (pass --model ARCH)")
    if method != "svd" and recipe.factorize.calib_data is None:
        raise LowrankError(
            f"factorize.method '{method}' needs calibration data: pass --calib-data DIR|digits|synthetic "
            "(and --calib-samples N), or set factorize.calib_data in the recipe"
        )

    if arch is None:
        _no_latency_without_arch(recipe, path)
        plans = plan_layers(weight_candidates(header), recipe)
        alloc = None
        with open_tensors(path) as f:
            if recipe.factorize.rank_rule == "budget":
                alloc = allocate_ranks(plans, lambda n: torch.linalg.svdvals(f.get_tensor(f"{n}.weight").float()), recipe.factorize.min_rank).to_dict()
            todo = sum(p.factorized for p in plans)
            tensors = factorize_state_dict(f.get_tensor, plans, list(header.tensors), progress(todo) if progress else None)
        before = sum(t.numel for t in header.tensors.values() if t.dtype in {"F64", "F32", "F16", "BF16"})
        after = sum(t.numel() for t in tensors.values() if t.is_floating_point())
        manifest = build_manifest(None, {}, plans, recipe, path)
        save_checkpoint(out, tensors, manifest, force=force, inputs=inputs)
        insp = Inspection(str(path), None, {}, False, before, after, None, None, plans, [], _rule_label(recipe), alloc)
        return FactorizeResult(out, insp, manifest)

    model, _ = build_model(path, arch, kwargs)
    kwargs = model_kwargs_of(model, kwargs)
    before = count_params(model)
    macs = count_macs(model)
    todo = sum(p.factorized for p in plan_layers(linear_candidates(model), recipe))
    calibration = None
    if method != "svd":
        f = recipe.factorize
        calibration = calibration_batches(f.calib_data, model, f.calib_samples, f.calib_batch_size)
    allocs: list = []
    latency = LatencySelection(recipe.select, macs.linear_rows, layer_timer) if recipe.select.latency_aware else None
    plans = factorize_model(model, recipe, progress(todo) if progress else None, calibration, allocs.append, latency)
    timings = latency.to_dict() if latency is not None else None
    manifest = build_manifest(arch, kwargs, plans, recipe, path, method, timings)
    save_checkpoint(out, model.state_dict(), manifest, force=force, inputs=inputs)
    insp = Inspection(
        str(path) if path else None, arch, kwargs, False, before, count_params(model),
        macs.macs, macs.macs_after(plans), plans, [], _rule_label(recipe), allocs[0].to_dict() if allocs else None, timings,
    )
    return FactorizeResult(out, insp, manifest)

