"""Building timm models from a name, a recipe or a manifest, and loading checkpoints strictly."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import nn

from lowrank_cli.checkpoint import CheckpointHeader, load_tensors, read_header, strip_prefix
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize import apply_manifest_structure


def create_model(arch: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """`timm.create_model(arch, pretrained=False, **model_kwargs)`, with errors as sentences."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.7)
        hint = f" (did you mean {', '.join(close)}?)" if close else "; see timm.list_models()"
        raise LowrankError(f"unknown timm architecture '{arch}'{hint}")
    try:
        return timm.create_model(arch, pretrained=False, **(model_kwargs or {}))
    except TypeError as e:
        raise LowrankError(f"architecture '{arch}' does not accept these settings {model_kwargs}: {e}") from None
    except (ValueError, AssertionError, RuntimeError) as e:
        raise LowrankError(f"architecture '{arch}' cannot be built with {model_kwargs}: {e}") from None


def infer_model_kwargs(arch: str, header: CheckpointHeader, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Add `num_classes` from the checkpoint's classifier weight when the user did not give it.

    A model fine-tuned on 10 classes has `head.weight` of shape (10, D); building the stock
    1000-class model would only fail the strict load.
    """
    kwargs = dict(model_kwargs or {})
    if "num_classes" in kwargs:
        return kwargs
    cfg = timm.models.get_pretrained_cfg(arch)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(classifier, str):
        names = {k.removeprefix("module."): v for k, v in header.tensors.items()}
        for key in (f"{classifier}.weight", f"{classifier}.up.weight"):
            if key in names and len(names[key].shape) == 2:
                kwargs["num_classes"] = names[key].shape[0]
                break
    return kwargs


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
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:4]) + (f", ... ({len(items) - 4} more)" if len(items) > 4 else "")
                parts.append(f"{len(items)} {label} ({shown})")
        what = f"architecture '{arch}'" if arch else "the model"
        raise LowrankError(
            f"{source} does not match {what}: {'; '.join(parts)}. "
            "Check --model, and pass its settings with --model-arg KEY=VALUE (e.g. img_size=384)"
        )
    model.load_state_dict(state_dict, strict=True)


def build_model(
    path: str | os.PathLike | None,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, CheckpointHeader | None]:
    """Build a model and load a checkpoint into it strictly.

    A factorized checkpoint (with a manifest) rebuilds its own architecture and low-rank
    structure; `arch` then must agree with the manifest when given. A plain checkpoint needs
    `arch`. With `path=None`, the architecture gets random weights.
    """
    if path is None:
        if arch is None:
            raise LowrankError("give a checkpoint, or an architecture with --model (or a recipe with 'model:')")
        return create_model(arch, model_kwargs).eval(), None
    header = read_header(path)
    manifest = header.manifest
    if manifest is not None:
        m_arch = manifest.get("architecture")
        if m_arch is None:
            raise LowrankError(
                f"{path}: was factorized weight-only (no architecture recorded); "
                "read its tensors with lowrank_cli.checkpoint.load_tensors instead of building a model"
            )
        if arch is not None and arch != m_arch:
            raise LowrankError(f"{path}: was factorized from '{m_arch}', not '{arch}'; drop --model or use '{m_arch}'")
        model = create_model(m_arch, {**manifest.get("model_kwargs", {}), **(model_kwargs or {})})
        apply_manifest_structure(model, manifest["layers"])
        arch = m_arch
    else:
        if arch is None:
            raise LowrankError(f"{path}: has no lowrank manifest; name its timm architecture with --model ARCH")
        model = create_model(arch, infer_model_kwargs(arch, header, model_kwargs))
    load_state_dict_strict(model, load_tensors(path), path, arch)
    return model.eval(), header


def load(path: str | os.PathLike, model: str | None = None, **model_kwargs: Any) -> nn.Module:
    """Rebuild a model from a checkpoint, in eval mode, with no pickles and a strict load.

    A checkpoint written by `lowrank factorize` (or a training run) rebuilds its timm
    architecture and `LowRankLinear` layers from its manifest. A plain timm checkpoint
    needs `model=` (the timm architecture name) and any settings it was built with.
    """
    built, _ = build_model(Path(path), model, model_kwargs or None)
    return built


def model_kwargs_of(model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    """The kwargs to record in a manifest: what the user gave plus the inferred num_classes."""
    kwargs = dict(given)
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        kwargs["num_classes"] = num_classes
    return kwargs


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """`["depth=2", "img_size=64"]` -> `{"depth": 2, "img_size": 64}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LowrankError(f"--model-arg '{item}': expected KEY=VALUE, e.g. img_size=384 or depths=[2,2,6,2]")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise LowrankError(f"--model-arg '{item}': value '{value}' is not a number, list or string") from None
    return out
