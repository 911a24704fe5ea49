"""`lowrank inspect`: what is in a checkpoint, which layers can be factorized, and what each rank saves.

Without an architecture only the header is read (and, for spectra, one weight at a time):
no model is built. With one, the model is built, the checkpoint loaded strictly and MACs
counted before and after factorization. A factorized checkpoint reports the ranks it was
factorized with. Returns plain data (`Inspection`) that the CLI renders and `--json` prints.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.manifest import Manifest
from lowrank_cli.io.safetensors import CheckpointHeader, open_tensors, read_header, read_tensors
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.models.build import Built, NoArchitecture, build_model, hub_config
from lowrank_cli.models.family import TextConfig, get_family
from lowrank_cli.models.skeleton import build_skeleton, source_keys, zero_weights
from lowrank_cli.nn.lowrank import dense_weight
from lowrank_cli.pipelines.common import hint_of
from lowrank_cli.plan.budget import allocate_ranks
from lowrank_cli.plan.latency import LatencySelection, LayerTimer
from lowrank_cli.plan.select import LayerPlan, plan_embeddings, plan_layers, saved_params, weight_candidates
from lowrank_cli.recipe import Recipe

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass
class Inspection:
    """What `inspect` (or `factorize`) found. MACs per example; None without an architecture."""

    checkpoint: str | None
    layers: list[LayerPlan]
    params_before: int
    params_after: int
    architecture: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    factorized_checkpoint: bool = False
    macs_before: int | None = None
    macs_after: int | None = None
    tensors: list[dict[str, Any]] = field(default_factory=list)
    rank_rule: str = ""
    allocation: dict[str, Any] | None = None  # rank_rule budget: plan.Allocation.to_dict()
    latency: dict[str, Any] | None = None  # select.latency_aware: plan.LatencySelection.to_dict()
    architecture_source: str | None = None  # given, manifest, config.json, recipe, search, random
    notes: list[str] = field(default_factory=list)
    seq_len: int | None = None  # text models: the tokens per example the MACs are counted at

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
            "architecture_source": self.architecture_source,
            "notes": self.notes,
            "seq_len": self.seq_len,
        }


def header_params(header: CheckpointHeader) -> int:
    """Floating-point parameters of a checkpoint, from its header alone."""
    return sum(t.numel for t in header.tensors.values() if t.dtype in FLOAT_DTYPES)


def tensor_rows(header: CheckpointHeader) -> list[dict[str, Any]]:
    """Each tensor of a checkpoint; integer ones are buffers (e.g. position ids), not parameters: 0 params."""
    return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "params": t.numel if t.dtype in FLOAT_DTYPES else 0,
             "buffer": t.dtype not in FLOAT_DTYPES} for t in header.tensors.values()]


def model_tensor_rows(model: torch.nn.Module) -> list[dict[str, Any]]:
    return [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "params": v.numel() if v.is_floating_point() else 0,
             "buffer": not v.is_floating_point()} for k, v in model.state_dict().items()]


def plan_weight_only(header: CheckpointHeader, recipe: Recipe, need_spectrum: bool) -> tuple[list[LayerPlan], dict | None]:
    """Plans for a checkpoint without an architecture: every 2-D weight from the header, spectra read one weight at a time."""
    no_latency_without_arch(recipe, header.path)
    budget = recipe.factorize.rank_rule == "budget"
    with contextlib.ExitStack() as stack:
        spec = None
        if need_spectrum or budget:
            f = stack.enter_context(open_tensors(header.path))
            spec = functools.cache(lambda name: torch.linalg.svdvals(f.get_tensor(f"{name}.weight").float()))
        plans = plan_layers(weight_candidates(header), recipe, spec if need_spectrum else None)
        alloc = allocate_ranks(plans, spec, recipe.factorize.min_rank).to_dict() if budget else None
    return plans, alloc


_STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hub_skeleton(header: CheckpointHeader, arch: str | None, model_kwargs: dict[str, Any]) -> tuple[Built, dict[str, str]] | None:
    """A transformers Hub folder's model without its weights (`models.skeleton`: parameters on the meta device) and the
    checkpoint's name for each tensor its state dict saves (`models.skeleton.source_keys`), or None where the weights
    must be loaded by transformers itself: not such a folder, or tensors its loader would change (stored in another dtype
    than it loads them in, keys it renames, drops or must fill in, shapes that do not fit, layers it keeps in fp32)."""
    cfg = hub_config(header)
    if cfg is None or "model_type" not in cfg or Manifest.from_header(header) is not None:
        return None
    family = get_family("transformers")
    source = "config.json" if arch is None else "given"
    arch = arch or family.architecture_for(cfg)
    kwargs = family.complete_kwargs(arch, header, {**cfg, **model_kwargs})
    stored = {_STORED[t.dtype] for t in header.tensors.values() if t.dtype in _STORED}
    named = kwargs.get("dtype") or kwargs.get("torch_dtype")  # what from_pretrained loads in (its dtype "auto")
    if len(stored) != 1 or (isinstance(named, str) and getattr(torch, named, None) not in stored):
        return None
    model = build_skeleton(family, arch, kwargs)
    if getattr(model, "_keep_in_fp32_modules", None):
        return None
    sources, missing, unexpected = source_keys(model, header.tensors)
    state = model.state_dict(keep_vars=True)
    if missing or unexpected or any(tuple(state[k].shape) != header.tensors[v].shape for k, v in sources.items()):
        return None  # the loader's error names what does not fit
    return Built(model, family, arch, family.recorded_kwargs(model, kwargs), header, None, source), sources


def text_length(family, model, seq_len: int | None) -> int | None:
    """The tokens per example a text model is counted and timed at (`seq_len`, else the family's default); None for images."""
    cfg = family.data_config(model)
    if not isinstance(cfg, TextConfig):
        if seq_len is not None:
            raise LowrankError(f"seq_len applies to text models; {type(model).__name__} takes images", param="seq_len")
        return None
    length = seq_len or cfg.max_length
    limit = family.max_positions(model)
    if limit is not None and length > limit:
        raise LowrankError(f"seq_len {length} is above the model's maximum of {limit} positions", param="seq_len")
    return length


def example_at(family, model, seq_len: int | None = None, batch: int = 1):
    """The family's example inputs, at `seq_len` tokens for a text model (checked against its positions)."""
    return family.example_inputs(model, batch, seq_len=text_length(family, model, seq_len))


def check_calibration(recipe: Recipe) -> None:
    """`factorize.method: whitened | asvd` and `factorize.allocation: sensitivity` need calibration data: checked the same
    way by `inspect` and `factorize`."""
    method = recipe.factorize.method
    calibrated = recipe.with_calibration_default().factorize.calib_data is not None
    if recipe.factorize.allocation == "sensitivity" and not calibrated:
        raise LowrankError("factorize.allocation 'sensitivity' needs calibration data to measure each layer's sensitivity: a folder "
                           "of images, 'digits' or 'synthetic'; for text models 'pydoc', a .txt or .jsonl file or a folder of them "
                           "(argument `calib_data`, recipe key factorize.calib_data, else data.source)", param="calib_data")
    if method != "svd" and not calibrated:
        raise LowrankError(f"factorize.method '{method}' needs calibration data: a folder of images, 'digits' or 'synthetic'; for text models "
                           "'pydoc', a .txt or .jsonl file or a folder of them "
                           "(argument `calib_data`, recipe key factorize.calib_data, else data.source)", param="calib_data")


def build_or_weight_only(path, arch: str | None, model_kwargs: dict[str, Any], recipe: Recipe) -> tuple[Built | None, str | None]:
    """The model of a plain checkpoint, its architecture given or found (`models.build_model`), or None and the
    reason when none is found: the checkpoint is then handled weight-only, from its tensors alone."""
    try:
        return build_model(path, arch, model_kwargs, hint=hint_of(recipe)), None
    except NoArchitecture as e:
        method = recipe.factorize.method
        if recipe.factorize.allocation == "sensitivity":
            raise LowrankError(f"factorize.allocation 'sensitivity' needs an architecture to run calibration data through (forward and "
                               f"backward): {e}; or set factorize.allocation to 'uniform'", param="model") from None
        if method != "svd":
            raise LowrankError(f"factorize.method '{method}' needs an architecture to run calibration data through: {e}", param="model") from None
        return None, str(e)


def no_latency_without_arch(recipe: Recipe, path) -> None:
    if recipe.select.latency_aware:
        raise LowrankError(
            f"{path}: select.latency_aware needs an architecture to know each layer's token count; "
            "name the architecture (argument `arch`, recipe key `model`), or turn select.latency_aware off", param="model"
        )


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
    weight = weight or (lambda name: dense_weight(model.get_submodule(name))[0])
    spec = functools.cache(lambda name: torch.linalg.svdvals(weight(name).float())) if needs_spectrum else None  # σ(Wᵀ) = σ(W)
    plans = plan_layers(family.linear_candidates(model), recipe, spec)
    length = text_length(family, model, seq_len)
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
    length = text_length(family, model, seq_len)
    macs = count_macs(model, family.example_inputs(model, seq_len=length), family.forward)
    inner = {"embedding": "lookup"}  # the module of a factorized layer whose input rows count its tokens
    macs_before = macs.macs + sum(macs.linear_rows.get(f"{p.name}.{inner.get(p.kind, 'down')}", 0) * p.macs_per_token_saved for p in plans)
    return Inspection(
        str(header.path), plans + dense, after + saved_params(plans), after, architecture=manifest.architecture,
        model_kwargs=manifest.model_kwargs, macs_before=macs_before, macs_after=macs.macs, seq_len=length, **common,
    )
