"""Building a model from a checkpoint (its manifest, or an architecture), and loading it strictly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.manifest import Manifest, read_checkpoint
from lowrank_cli.io.safetensors import CheckpointHeader, read_header, strip_prefix
from lowrank_cli.models.family import ModelFamily, get_family

DEFAULT_FAMILY = "timm"


@dataclass
class Built:
    """A model built from a checkpoint: its family, architecture and settings, the file's header and manifest."""

    model: nn.Module
    family: ModelFamily
    architecture: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # the settings to record (what rebuilds it)
    header: CheckpointHeader | None = None
    manifest: Manifest | None = None


def create_model(arch: str, model_kwargs: dict[str, Any] | None = None, family: str = DEFAULT_FAMILY) -> nn.Module:
    """The architecture `arch` of `family` with random weights (timm: `timm.create_model(arch, pretrained=False, ...)`)."""
    return get_family(family).create(arch, dict(model_kwargs or {}))


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | os.PathLike, arch: str | None) -> None:
    """`model.load_state_dict(state_dict, strict=True)`, failing with one line that names the keys."""
    state_dict = strip_prefix(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    mismatched += [
        f"{k}: checkpoint {str(state_dict[k].dtype).removeprefix('torch.')} vs model {str(v.dtype).removeprefix('torch.')}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape == v.shape and state_dict[k].is_floating_point() != v.is_floating_point()
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:4]) + (f", ... ({len(items) - 4} more)" if len(items) > 4 else "")
                parts.append(f"{len(items)} {label} ({shown})")
        what = f"architecture '{arch}'" if arch else "the model"
        raise LowrankError(
            f"{source} does not match {what}: {'; '.join(parts)}. "
            "Check the architecture and the settings it was trained with (e.g. img_size=384)",
            param="model",
        )
    model.load_state_dict(state_dict, strict=True)


def build_model(
    path: str | os.PathLike | None,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    *,
    family: str | None = None,
) -> Built:
    """Build a model and load a checkpoint into it strictly.

    A factorized checkpoint (with a manifest) rebuilds its own family, architecture and
    low-rank structure; `arch` then must agree with the manifest when given. A plain checkpoint
    needs `arch`. With `path=None`, the architecture gets random weights.
    """
    if path is None:
        if arch is None:
            raise LowrankError("give a checkpoint, or an architecture (argument `arch`, recipe key `model`)", param="model")
        fam = get_family(family or DEFAULT_FAMILY)
        kwargs = dict(model_kwargs or {})
        model = fam.create(arch, kwargs).eval()
        return Built(model, fam, arch, fam.recorded_kwargs(model, kwargs))
    header = read_header(path)
    manifest = Manifest.from_header(header)
    if manifest is not None:
        if manifest.weight_only:
            raise LowrankError(
                f"{path}: was factorized weight-only (no architecture recorded); "
                "read its tensors with lowrank_cli.io.load_tensors instead of building a model"
            )
        if arch is not None and arch != manifest.architecture:
            raise LowrankError(f"{path}: was factorized from '{manifest.architecture}', not '{arch}'; drop the architecture or use '{manifest.architecture}'", param="model")
        fam = get_family(manifest.family or DEFAULT_FAMILY)
        arch = manifest.architecture
        kwargs = {**manifest.model_kwargs, **(model_kwargs or {})}
        model = fam.create(arch, kwargs)
        manifest.apply(model)
    else:
        if arch is None:
            raise LowrankError(f"{path}: has no lowrank manifest; name its architecture (argument `arch`, recipe key `model`)", param="model")
        fam = get_family(family or DEFAULT_FAMILY)
        kwargs = fam.complete_kwargs(arch, header, dict(model_kwargs or {}))
        model = fam.create(arch, kwargs)
    load_state_dict_strict(model, read_checkpoint(path)[2], path, arch)
    return Built(model.eval(), fam, arch, fam.recorded_kwargs(model, kwargs), header, manifest)


def load(path: str | os.PathLike, model: str | None = None, **model_kwargs: Any) -> nn.Module:
    """Rebuild a model from a checkpoint, in eval mode, with no pickles and a strict load.

    A checkpoint written by `lowrank factorize` (or a training run) rebuilds its architecture
    and `LowRankLinear` layers from its manifest. A plain checkpoint needs `model=` (the timm
    architecture name) and any settings it was built with.
    """
    return build_model(Path(path), model, model_kwargs or None).model
