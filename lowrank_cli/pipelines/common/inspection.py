"""What `inspect` and `factorize` report (`Inspection`), and what both do the same way: the checks of calibration
settings, building the model or falling back to weight-only, and planning a checkpoint from its tensors alone."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.safetensors import CheckpointHeader, open_tensors
from lowrank_cli.models.build import Built, NoArchitecture, build_model
from lowrank_cli.pipelines.common import hint_of
from lowrank_cli.plan.budget import allocate_ranks
from lowrank_cli.plan.select import LayerPlan, plan_layers, weight_candidates
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


