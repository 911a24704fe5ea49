"""A model's skeleton: its modules, shapes and ties without its weights, for work that reads the weights one at a time.

Streamed factorization plans, names and counts from the skeleton and reads each weight from the
checkpoint only when it factorizes or copies it, so that the model is never whole in memory.
Parameters live on the meta device (no memory, no initialization); buffers stay real, since a
model computes some of them at construction (rotary frequencies) and never stores them.
"""

from __future__ import annotations

from typing import Any, Collection

import torch
from torch import nn

from lowrank_cli.io.manifest import Manifest
from lowrank_cli.io.safetensors import CheckpointHeader
from lowrank_cli.models.build import Built, hub_config
from lowrank_cli.models.family import ModelFamily, get_family
from lowrank_cli.nn.surgery import parameters_on_meta


def build_skeleton(family: ModelFamily, architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    """`family.create(architecture, kwargs)` with its parameters on the meta device, in eval mode."""
    with parameters_on_meta():
        return family.create(architecture, kwargs).eval()


def zero_weights(model: nn.Module) -> nn.Module:
    """Give every meta parameter a zero of its shape and dtype that takes no memory (one element, expanded), tied
    parameters staying tied: a model that runs a forward pass at the cost of its activations (MAC counting)."""
    zeros: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in zeros:
                zeros[id(param)] = nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape), requires_grad=False)
            module._parameters[name] = zeros[id(param)]
    return model


def state_names(model: nn.Module) -> list[list[str]]:
    """The model's state dict as it is saved: one entry per tensor, tied tensors once, each with all its names (the
    first the one it is saved under, as `io.manifest.tied_once` keeps it)."""
    groups: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(key)
    return list(groups.values())


def source_keys(model: nn.Module, present: Collection[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(saved name -> the checkpoint's name for it, the missing names, the checkpoint's names the model does not have):
    a tied tensor may be stored under any of its names."""
    found, missing, known = {}, [], set()
    for names in state_names(model):
        known.update(names)
        source = next((n for n in names if n in present), None)
        if source is None:
            missing.append(names[0])
        else:
            found[names[0]] = source
    return found, missing, [k for k in present if k not in known]


_STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hub_skeleton(header: CheckpointHeader, arch: str | None, model_kwargs: dict[str, Any]) -> tuple[Built, dict[str, str]] | None:
    """A transformers Hub folder's model without its weights (parameters on the meta device) and the checkpoint's name for
    each tensor its state dict saves (`source_keys`), or None where the weights must be loaded by transformers itself: not
    such a folder, or tensors its loader would change (stored in another dtype than it loads them in, keys it renames,
    drops or must fill in, shapes that do not fit, layers it keeps in fp32)."""
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
