"""Building a model from a checkpoint (its manifest, or an architecture), and loading it strictly."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.manifest import Manifest, read_checkpoint
from lowrank_cli.io.safetensors import CheckpointHeader, read_header, strip_prefix
from lowrank_cli.models.family import ModelFamily, fill_tied, get_family, recognizes
from lowrank_cli.nn.lowrank import inference_layout
from lowrank_cli.nn.surgery import parameters_on_meta

DEFAULT_FAMILY = "timm"


@dataclass
class Built:
    """A model built from a checkpoint: its family, architecture and settings, the file's header and manifest,
    and where the architecture came from (`given`, `manifest`, `config.json`, `recipe`, `search`, `random`)."""

    model: nn.Module
    family: ModelFamily
    architecture: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # the settings to record (what rebuilds it)
    header: CheckpointHeader | None = None
    manifest: Manifest | None = None
    source: str = "given"
    note: str | None = None

    @property
    def folder(self) -> Path | None:
        """The Hub-style folder the checkpoint came from (its config, tokenizer files), if any."""
        return self.header.folder if self.header is not None else None


@dataclass(frozen=True)
class ArchitectureHint:
    """Where to look for a checkpoint's architecture when none is given: a recipe's `model` (taken when the
    tensors fit it, with its `model_kwargs`) and the patterns of its family to search (recipe key `architectures`)."""

    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    patterns: tuple[str, ...] = ()


class NoArchitecture(LowrankError):
    """No architecture was given and none could be found for a checkpoint."""


@dataclass
class Resolved:
    family: str
    architecture: str
    kwargs: dict[str, Any]
    source: str
    note: str | None = None


def hub_config(header: CheckpointHeader) -> dict[str, Any] | None:
    """The `config.json` of a checkpoint's Hub-style folder, when there is one."""
    if header.folder is None:
        return None
    cfg = header.folder / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowrankError(f"{cfg}: not a valid JSON config ({getattr(e, 'msg', e)})") from None
    if not isinstance(data, dict):
        raise LowrankError(f"{cfg}: a model config must be a JSON object")
    return data


def resolve_architecture(path: Path, header: CheckpointHeader, model_kwargs: dict[str, Any], hint: ArchitectureHint | None) -> Resolved:
    """A plain checkpoint's architecture when none is given: its `config.json` (timm's Hub config), then the
    hint's `model` if the tensors fit it, then a search of the hint's patterns. NoArchitecture otherwise.
    When the hint's model is not taken, the note of the one found (or the error) says why: not a timm
    architecture, not buildable with its `model_kwargs`, or the tensors that differ."""
    cfg = hub_config(header)
    if cfg is not None and "model_type" in cfg:  # a transformers model
        return Resolved("transformers", get_family("transformers").architecture_for(cfg), {**cfg, **model_kwargs}, "config.json")
    if cfg is not None and isinstance(cfg.get("architecture"), str):  # timm's own Hub config
        model_args = cfg.get("model_args") or {}
        if not isinstance(model_args, dict):
            raise LowrankError(f"{header.folder / 'config.json'}: 'model_args' must be a map of settings")
        kwargs = {**model_args, **({"num_classes": cfg["num_classes"]} if isinstance(cfg.get("num_classes"), int) else {}), **model_kwargs}
        return Resolved("timm", cfg["architecture"], kwargs, "config.json")
    if cfg is not None:
        raise LowrankError(f"{header.folder / 'config.json'}: neither a transformers config ('model_type') nor timm's ('architecture')")
    hint = hint or ArchitectureHint()
    if not recognizes(DEFAULT_FAMILY, header):  # decided from the header alone: timm is not even imported
        raise NoArchitecture(f"{path}: has no lowrank manifest and no config.json, and its tensors are not a timm vision "
                             "model's; name its architecture (argument `arch`, recipe key `model`)", param="model")
    timm_family = get_family(DEFAULT_FAMILY)
    why = ""  # why the recipe's model was not taken, said wherever another is
    if hint.model is not None:
        kwargs = timm_family.complete_kwargs(hint.model, header, {**hint.model_kwargs, **model_kwargs})
        problem = timm_family.misfit(hint.model, header, kwargs)
        if problem is None:
            return Resolved(DEFAULT_FAMILY, hint.model, kwargs, "recipe")
        given = {**hint.model_kwargs, **model_kwargs}
        settings = f" (model_kwargs {given})" if given and not problem.startswith("is not") else ""
        why = f"recipe model '{hint.model}'{settings} {problem}"
    if not hint.patterns:
        reason = why or f"its tensors do not fit {hint.model or 'any architecture given'}"
        raise NoArchitecture(f"{path}: {reason}, and no architectures were given to search (recipe key `architectures`); "
                             "name its architecture (argument `arch`)", param="model")
    try:
        found = timm_family.find_architecture(header, list(hint.patterns), hint.model)
    except LowrankError as e:
        raise NoArchitecture(f"{e}" + (f"; {why}" if why else ""), param="model") from None
    also = f"; these fit as well: {', '.join(found.also_fit[:4])}" if found.also_fit else ""
    settings = ", ".join(f"{k}={v}" for k, v in found.kwargs.items())
    note = f"architecture {found.architecture} ({settings}) found from the tensors among {found.tried} of {', '.join(hint.patterns)}{also}"
    if why:
        note = f"{why}; using {found.architecture} ({settings}) found from the tensors among {found.tried} of {', '.join(hint.patterns)}{also}"
    return Resolved(DEFAULT_FAMILY, found.architecture, {**found.kwargs, **model_kwargs}, "search", note)


def create_model(arch: str, model_kwargs: dict[str, Any] | None = None, family: str = DEFAULT_FAMILY) -> nn.Module:
    """The architecture `arch` of `family` with random weights (timm: `timm.create_model(arch, pretrained=False, ...)`)."""
    return get_family(family).create(arch, dict(model_kwargs or {}))


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | os.PathLike, arch: str | None) -> None:
    """`model.load_state_dict(state_dict, strict=True)`, failing with one line that names the keys. A tensor the model ties
    under several names (stored once) counts under each of them."""
    state_dict = fill_tied(model, strip_prefix(state_dict))
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
    if any(p.is_meta for p in model.parameters()):
        _assign(model, state_dict, expected)
    else:
        model.load_state_dict(state_dict, strict=True)


def _assign(model: nn.Module, state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Load into a model whose parameters are on the meta device: the checkpoint's tensors become the parameters (no
    second copy), in the dtype the model was built with; parameters the model ties stay one parameter; buffers are
    copied into as `load_state_dict` does (their dtype kept)."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    names: dict[int, str] = {}
    for prefix, module in model.named_modules():
        for leaf, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, leaf))
                names.setdefault(id(param), f"{prefix}.{leaf}" if prefix else leaf)
    for key, group in holders.items():
        old = group[0][0]._parameters[group[0][1]]
        value = state_dict[names[key]]
        value = value.to(old.dtype) if value.is_floating_point() and old.is_floating_point() else value
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        for module, leaf in group:
            module._parameters[leaf] = new
    with torch.no_grad():
        for key, buffer in model.state_dict(keep_vars=True).items():
            if key not in params and key in state_dict:
                buffer.copy_(state_dict[key])


def _built_for_load(fam: ModelFamily, arch: str, kwargs: dict[str, Any], manifest: Manifest | None) -> nn.Module:
    """The model to load a checkpoint into: built on the meta device (no weights initialized, the dense layers a manifest
    replaces never made), unless the model computes some state from its parameters' values or device while it is built
    (timm's Swin fills its window masks on its parameters' device): then built as usual."""
    try:
        with parameters_on_meta():
            model = fam.create(arch, kwargs)
            if manifest is not None:
                manifest.apply(model)
        if not _meta_state(model):
            return model
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is built as usual below, which names what is wrong
        pass
    model = fam.create(arch, kwargs)
    return manifest.apply(model) if manifest is not None else model


def _meta_state(model: nn.Module) -> bool:
    """Whether any buffer, or any tensor a module keeps as a plain attribute, is on the meta device."""
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            return True
        if any(isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_meta for v in vars(module).values()):
            return True
    return False


def build_model(
    path: str | os.PathLike | None,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    *,
    family: str | None = None,
    hint: ArchitectureHint | None = None,
) -> Built:
    """Build a model and load a checkpoint into it strictly.

    A factorized checkpoint (with a manifest) rebuilds its own family, architecture and
    low-rank structure; `arch` then must agree with the manifest when given. A plain checkpoint
    takes `arch`, or else the architecture is found (`resolve_architecture`: config.json, the
    hint's model, a search of the hint's patterns). With `path=None`, `arch` (or the hint's
    model) gets random weights.
    """
    if path is None:
        arch = arch or (hint.model if hint else None)
        if arch is None:
            raise LowrankError("give a checkpoint, or an architecture (argument `arch`, recipe key `model`)", param="model")
        fam = get_family(family or DEFAULT_FAMILY)
        kwargs = {**(hint.model_kwargs if hint and arch == hint.model else {}), **(model_kwargs or {})}
        model = fam.create(arch, kwargs).eval()
        return Built(model, fam, arch, fam.recorded_kwargs(model, kwargs), source="random")
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
        model = _built_for_load(fam, arch, kwargs, manifest)
        source, note = "manifest", None
    else:
        source, note = "given", None
        if arch is None:
            found = resolve_architecture(Path(path), header, dict(model_kwargs or {}), hint)
            arch, family, model_kwargs, source, note = found.architecture, found.family, found.kwargs, found.source, found.note
        elif family is None and (cfg := hub_config(header)) is not None and "model_type" in cfg:  # a class named for a Hub folder's config
            family, model_kwargs = "transformers", {**cfg, **(model_kwargs or {})}
        fam = get_family(family or DEFAULT_FAMILY)
        kwargs = fam.complete_kwargs(arch, header, dict(model_kwargs or {}))
        if header.folder is not None and (model := fam.load_pretrained(header.folder, arch, kwargs)) is not None:
            return Built(model.eval(), fam, arch, fam.recorded_kwargs(model, kwargs), header, manifest, source, note)
        model = _built_for_load(fam, arch, kwargs, None)
    load_state_dict_strict(model, fam.adapt_state_dict(model, read_checkpoint(path)[2]), path, arch)
    return Built(model.eval(), fam, arch, fam.recorded_kwargs(model, kwargs), header, manifest, source, note)


def load(path: str | os.PathLike, model: str | None = None, **model_kwargs: Any) -> nn.Module:
    """Rebuild a model from a checkpoint, in eval mode, with no pickles and a strict load.

    A checkpoint written by `lowrank factorize` (or a training run) rebuilds its architecture
    and `LowRankLinear` layers from its manifest. A plain checkpoint needs `model=` (the timm
    architecture name) and any settings it was built with. The factors are laid out for
    inference (`nn.lowrank.inference_layout`: the same values, faster products).
    """
    built = build_model(Path(path), model, model_kwargs or None).model
    inference_layout(built)
    return built
