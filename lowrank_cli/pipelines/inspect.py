"""`lowrank inspect`: what is in a checkpoint, which layers can be factorized, and what each rank saves.

Without an architecture only the header is read (and, for spectra, one weight at a time):
no model is built. With one, the model is built, the checkpoint loaded strictly and MACs
counted before and after factorization. A factorized checkpoint reports the ranks it was
factorized with. Returns plain data (`Inspection`) that the CLI renders and `--json` prints.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.model import check_method
from lowrank_cli.io.manifest import Manifest
from lowrank_cli.io.safetensors import CheckpointHeader, read_header, read_tensors
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.models.build import Built, build_model
from lowrank_cli.models.skeleton import hub_skeleton, zero_weights
from lowrank_cli.nn.lowrank import dense_weight
from lowrank_cli.pipelines.common.inspection import (Inspection, build_or_weight_only, check_calibration, header_params, model_tensor_rows,
                                                     plan_weight_only, tensor_rows)
from lowrank_cli.plan.budget import allocate_ranks
from lowrank_cli.plan.latency import LatencySelection, LayerTimer
from lowrank_cli.plan.select import LayerPlan, plan_embeddings, plan_layers, saved_params
from lowrank_cli.recipe import Recipe

def inspect_checkpoint(
    path: str | os.PathLike | None,
    recipe: Recipe,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    spectrum: bool = False,
    layer_timer: LayerTimer | None = None,
    seq_len: int | None = None,
) -> Inspection:
    """Inspect a checkpoint (or an architecture with random weights when `path` is None).

    A text model's MACs are counted at `seq_len` tokens per example (default: its family's, 128).
    `spectrum` computes each candidate's singular values to report the energy kept. With
    `select.latency_aware`, each planned layer is timed (`layer_timer`, default
    `measure.time_linear_layers`) and those not faster factorized stay dense.
    """
    header = read_header(path) if path is not None else None
    manifest = Manifest.from_header(header) if header is not None else None
    kwargs = dict(model_kwargs or {})
    if manifest is not None:
        if spectrum:
            raise LowrankError(f"{path}: is already factorized; a spectrum is computed from dense weights (inspect the original)", param="spectrum")
        return _inspect_factorized(header, manifest, arch, kwargs, seq_len)
    notes = []
    if recipe.factorize.allocation == "sensitivity":  # a backward pass over the calibration data: factorize's work, not inspect's
        notes.append("factorize.allocation 'sensitivity' is decided by factorize (one backward pass per calibration batch); "
                     "shown: the ranks of allocation 'uniform' at the same rule")
        recipe = recipe.model_copy(update={"factorize": recipe.factorize.model_copy(update={"allocation": "uniform"})})
    check_calibration(recipe)
    needs_spectrum = spectrum or recipe.factorize.rank_rule in ("energy", "budget")
    skeleton = hub_skeleton(header, arch, kwargs) if header is not None and not recipe.select.latency_aware else None
    if skeleton is not None:  # a Hub folder: its headers, one weight at a time for spectra, never the model's weights
        built, sources = skeleton
        with read_tensors(header) as reader:
            insp = _inspect_model(built, recipe, needs_spectrum, layer_timer, seq_len, lambda name: reader.get_tensor(sources[f"{name}.weight"]))
        insp.notes += notes
        return insp
    built, why = build_or_weight_only(path, arch, kwargs, recipe)
    if built is None:  # weight-only: the header is all we read, plus one weight at a time for spectra
        plans, alloc = plan_weight_only(header, recipe, needs_spectrum)
        before = header_params(header)
        return Inspection(str(path), plans, before, before - saved_params(plans), tensors=tensor_rows(header),
                          rank_rule=recipe.factorize.rule_label(), allocation=alloc, notes=[f"weight-only: {why}", *notes])
    insp = _inspect_model(built, recipe, needs_spectrum, layer_timer, seq_len)
    insp.notes += notes
    return insp


def _inspect_model(built: Built, recipe: Recipe, needs_spectrum: bool, layer_timer: LayerTimer | None, seq_len: int | None,
                   weight=None) -> Inspection:
    """`weight(name)`: a layer's weight as stored (a skeleton's, read from the checkpoint); default: the model's own."""
    model, family = built.model, built.family
    check_method(recipe, family.task(model))
    weight = weight or (lambda name: dense_weight(model.get_submodule(name))[0])
    spec = functools.cache(lambda name: torch.linalg.svdvals(weight(name).float())) if needs_spectrum else None  # σ(Wᵀ) = σ(W)
    plans = plan_layers(family.linear_candidates(model), recipe, spec)
    length = family.text_length(model, seq_len)
    macs = count_macs(zero_weights(model), family.example_inputs(model, seq_len=length), family.forward)  # a skeleton's: zeros of no memory
    alloc = None
    if recipe.factorize.rank_rule == "budget":  # allocated on σ(W): inspect has no calibration data
        alloc = allocate_ranks(plans, spec, recipe.factorize.min_rank, macs.linear_rows).to_dict()
    latency = None
    if recipe.select.latency_aware:
        sel = LatencySelection(recipe.select, macs.linear_rows, layer_timer)
        sel.decide(plans)
        latency = sel.to_dict()
    if recipe.factorize.embeddings is not None:
        plans += plan_embeddings(family.embedding_candidates(model), recipe)
    before = count_params(model)
    header = built.header
    return Inspection(
        str(header.path) if header is not None else None, plans, before, before - saved_params(plans),
        architecture=built.architecture, model_kwargs=built.model_kwargs, macs_before=macs.macs, macs_after=macs.macs_after(plans),
        tensors=tensor_rows(header) if header is not None else model_tensor_rows(model), rank_rule=recipe.factorize.rule_label(),
        allocation=alloc, latency=latency, architecture_source=built.source, notes=[built.note] if built.note else [], seq_len=length,
    )


def _inspect_factorized(header: CheckpointHeader, manifest: Manifest, arch: str | None, kwargs: dict, seq_len: int | None = None) -> Inspection:
    """A checkpoint written by `factorize`: report the ranks it was factorized with."""
    timed = (manifest.latency or {}).get("layers", {})  # written by a latency-aware factorize: timings and decisions
    plans = [LayerPlan.of(name, e) for name, e in manifest.layers.items()]
    for p in plans:
        p.latency = timed.get(p.name)
    rule = (manifest.recipe or {}).get("factorize", {}).get("rank_rule", "")
    common = dict(factorized_checkpoint=True, tensors=tensor_rows(header), rank_rule=rule, latency=manifest.latency, architecture_source="manifest")
    if manifest.weight_only:
        after = header_params(header)
        return Inspection(str(header.path), plans, after + saved_params(plans), after, **common)
    built = build_model(header.path, arch, kwargs)
    model, family = built.model, built.family
    dense = [
        LayerPlan(c.name, c.d_in, c.d_out, c.bias, False, None, None,
                  (timed.get(c.name) or {}).get("reason") or c.skip or "left dense when factorized", latency=timed.get(c.name))
        for c in family.linear_candidates(model)
    ]
    after = count_params(model)
    length = family.text_length(model, seq_len)
    macs = count_macs(model, family.example_inputs(model, seq_len=length), family.forward)
    inner = {"embedding": "lookup"}  # the module of a factorized layer whose input rows count its tokens
    macs_before = macs.macs + sum(macs.linear_rows.get(f"{p.name}.{inner.get(p.kind, 'down')}", 0) * p.macs_per_token_saved for p in plans)
    return Inspection(
        str(header.path), plans + dense, after + saved_params(plans), after, architecture=manifest.architecture,
        model_kwargs=manifest.model_kwargs, macs_before=macs_before, macs_after=macs.macs, seq_len=length, **common,
    )
