"""The `lowrank` manifest: what a factorized checkpoint records about itself, and the only code
that writes, reads, validates and applies it.

It lives as JSON in the safetensors metadata under the key `lowrank`:

```
format_version   1
lowrank_version  the version that wrote it
family           "timm" (absent in early version-1 files: timm is assumed)
architecture     the model's architecture (None for a weight-only factorization)
model_kwargs     the settings the architecture was built with
layers           {name: {rank, d_in, d_out, bias, rule, method}} for each factorized layer
recipe           the resolved recipe
source           {file, sha256} of the checkpoint it was factorized from
latency          the timings of a latency-aware selection (optional)
distill          the distillation record of a trained student (optional)
```

Keys this version does not know are kept as they are when a manifest is read and written back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowrank_cli._version import __version__
from lowrank_cli.errors import LowrankError
from lowrank_cli.io.safetensors import CheckpointHeader
from lowrank_cli.nn.lowrank import LowRankLinear
from lowrank_cli.nn.surgery import named_in, replace_modules

MANIFEST_KEY = "lowrank"
FORMAT_VERSION = 1
_KNOWN = ("format_version", "lowrank_version", "family", "architecture", "model_kwargs", "layers", "recipe", "source", "latency", "distill")


@dataclass(frozen=True)
class LayerEntry:
    """One factorized layer: `d_out × d_in` replaced by rank-`rank` factors."""

    rank: int
    d_in: int
    d_out: int
    bias: bool = True
    rule: str | None = None
    method: str = "svd"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Manifest:
    """A factorized checkpoint's own account of itself (see the module docstring)."""

    layers: dict[str, LayerEntry]
    architecture: str | None = None
    family: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    lowrank_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_only(self) -> bool:
        """Factorized from the file alone: no architecture to rebuild a model from."""
        return self.architecture is None

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    # -- writing ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            **self.extra,
            "format_version": self.format_version,
            "lowrank_version": self.lowrank_version,
            "architecture": self.architecture,
            "model_kwargs": self.model_kwargs,
            "layers": {name: e.to_dict() for name, e in self.layers.items()},
            "recipe": self.recipe,
            "source": self.source,
        }
        if self.family is not None:
            d["family"] = self.family
        for key in ("latency", "distill"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata entry that carries this manifest."""
        return {MANIFEST_KEY: json.dumps(self.to_dict(), sort_keys=True)}

    # -- reading ------------------------------------------------------------------------------
    @classmethod
    def from_header(cls, header: CheckpointHeader) -> "Manifest | None":
        """The manifest of a checkpoint, or None for a file that has none (any other safetensors file)."""
        raw = header.metadata.get(MANIFEST_KEY)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LowrankError(f"{header.path}: the '{MANIFEST_KEY}' metadata is not valid JSON ({e.msg})") from None
        return cls.from_dict(data, source=str(header.path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> "Manifest":
        if not isinstance(data, dict) or "layers" not in data:
            raise LowrankError(f"{source}: the '{MANIFEST_KEY}' metadata is not a lowrank manifest (no 'layers')")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise LowrankError(f"{source}: manifest format_version {version!r} is not supported (this lowrank reads version {FORMAT_VERSION})")
        layers = {}
        for name, e in data["layers"].items():
            try:
                layers[name] = LayerEntry(int(e["rank"]), int(e["d_in"]), int(e["d_out"]), bool(e.get("bias", True)), e.get("rule"), e.get("method", "svd"))
            except (KeyError, TypeError, ValueError):
                raise LowrankError(f"{source}: manifest layer '{name}' is not a layer entry (rank, d_in, d_out, bias)") from None
        architecture = data.get("architecture")
        family = data.get("family") or ("timm" if architecture is not None else None)
        return cls(
            layers=layers, architecture=architecture, family=family, model_kwargs=dict(data.get("model_kwargs") or {}),
            recipe=data.get("recipe"), source=data.get("source"), latency=data.get("latency"), distill=data.get("distill"),
            format_version=version, lowrank_version=str(data.get("lowrank_version", "")),
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )

    # -- applying -----------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Swap in empty `LowRankLinear`s where the manifest says, so that a factorized state dict loads strictly."""
        for name, entry in self.layers.items():
            try:
                dense = model.get_submodule(name)
            except AttributeError:
                raise LowrankError(f"manifest layer '{name}' is not a module of the model") from None
            if not isinstance(dense, nn.Linear) or (dense.in_features, dense.out_features) != (entry.d_in, entry.d_out):
                raise LowrankError(f"manifest layer '{name}' ({entry.d_out}x{entry.d_in}) does not match the model's {dense!r}")

        def empty(name: str, _dense: nn.Module) -> LowRankLinear:
            e = self.layers[name]
            return LowRankLinear(e.d_in, e.d_out, e.rank, bias=e.bias)

        replace_modules(model, empty, named_in(self.layers))
        return model
