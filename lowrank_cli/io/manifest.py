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
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_cli._version import __version__
from lowrank_cli.errors import LowrankError
from lowrank_cli.io.safetensors import FLOAT_DTYPES, CheckpointHeader, ShardWriter, digest_update, load_tensors, read_header, save_checkpoint
from lowrank_cli.nn.lowrank import LowRankEmbedding, LowRankLinear, is_conv1d, linear_dims
from lowrank_cli.nn.surgery import named_in, replace_modules

MANIFEST_KEY = "lowrank"
FORMAT_VERSION = 1
_KNOWN = ("format_version", "lowrank_version", "family", "architecture", "model_kwargs", "layers", "recipe", "source", "latency", "distill",
          "weights_sha256", "allocation")
METHODS = ("svd", "whitened", "asvd", "pclora")
KINDS = ("linear", "conv1d", "embedding")


@dataclass(frozen=True)
class LayerEntry:
    """One factorized layer: `d_out × d_in` replaced by rank-`rank` factors."""

    rank: int
    d_in: int
    d_out: int
    bias: bool = True
    rule: str | None = None
    method: str = "svd"
    kind: str = "linear"  # linear (nn.Linear), conv1d (GPT-2's transposed Conv1D), embedding (nn.Embedding: d_in = V, d_out = d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.kind == "linear":
            del d["kind"]  # as version-1 files of linears only have it
        return d

    def tensors(self, name: str) -> dict[str, tuple[int, ...]]:
        """The tensors this layer is stored as, with their shapes."""
        if self.kind == "embedding":
            return {f"{name}.lookup.weight": (self.d_in, self.rank), f"{name}.proj.weight": (self.d_out, self.rank)}
        shapes = {f"{name}.down.weight": (self.rank, self.d_in), f"{name}.up.weight": (self.d_out, self.rank)}
        if self.bias:
            shapes[f"{name}.up.bias"] = (self.d_out,)
        return shapes


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _layer_entry(name: Any, e: Any, where: str) -> LayerEntry:
    """One manifest layer entry, checked: integer rank, d_in, d_out with 1 <= rank <= min(d_in, d_out)."""
    if not isinstance(e, dict) or not all(k in e for k in ("rank", "d_in", "d_out")):
        raise LowrankError(f"{where} layer '{name}' is not a layer entry (rank, d_in, d_out, bias)")
    rank, d_in, d_out = e["rank"], e["d_in"], e["d_out"]
    if not all(_is_int(v) for v in (rank, d_in, d_out)) or d_in < 1 or d_out < 1:
        raise LowrankError(f"{where} layer '{name}': rank, d_in and d_out must be positive integers (got {rank!r}, {d_in!r}, {d_out!r})")
    if not 1 <= rank <= min(d_in, d_out):
        raise LowrankError(f"{where} layer '{name}': rank {rank} is outside 1..min(d_in, d_out) = 1..{min(d_in, d_out)}")
    bias, rule, method, kind = e.get("bias", True), e.get("rule"), e.get("method", "svd"), e.get("kind", "linear")
    if not isinstance(bias, bool) or not isinstance(rule, (str, type(None))) or method not in METHODS or kind not in KINDS:
        raise LowrankError(f"{where} layer '{name}': bias must be true/false, rule a string, method one of {', '.join(METHODS)}, "
                           f"kind one of {', '.join(KINDS)}")
    if kind == "embedding" and bias:
        raise LowrankError(f"{where} layer '{name}': an embedding has no bias")
    return LayerEntry(rank, d_in, d_out, bias, rule, method, kind)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: equal digests, equal tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        # flattened: a "contiguous" tensor may still have a size-1 last dimension with a stride other than 1
        # (a rank-1 factor cut from a column-major SVD), which a byte view refuses
        digest_update(h, name, t.dtype, t.shape, [t.contiguous().reshape(-1).view(torch.uint8).numpy().data] if t.numel() else None)
    return h.hexdigest()


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
    allocation: dict[str, Any] | None = None  # factorize.allocation sensitivity: the budget, uniform κ and each layer's c_l
    distill: dict[str, Any] | None = None
    weights_sha256: str | None = None  # tensors_digest of the tensors written with it (absent in early files)
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
        for key in ("latency", "allocation", "distill", "weights_sha256"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata entry that carries this manifest."""
        return {MANIFEST_KEY: json.dumps(self.to_dict(), sort_keys=True)}

    # -- reading ------------------------------------------------------------------------------
    @classmethod
    def from_header(cls, header: CheckpointHeader) -> "Manifest | None":
        """The manifest of a checkpoint, validated as a whole against its tensors; None for a file that has none."""
        raw = header.metadata.get(MANIFEST_KEY)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as e:
            raise LowrankError(f"{header.path}: the '{MANIFEST_KEY}' metadata is not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
        manifest = cls.from_dict(data, source=str(header.path))
        manifest.check_tensors(header)
        return manifest

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> "Manifest":
        """A manifest from its JSON form, every field's type and range checked (a LowrankError naming the key otherwise)."""
        where = f"{source}: manifest"
        if not isinstance(data, dict) or "layers" not in data:
            raise LowrankError(f"{source}: the '{MANIFEST_KEY}' metadata is not a lowrank manifest (no 'layers')")
        version = data.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise LowrankError(f"{where} format_version {version!r} is not supported (this lowrank reads version {FORMAT_VERSION})")
        if not isinstance(data["layers"], dict):
            raise LowrankError(f"{where} 'layers' must be a map of layer names to entries, not {type(data['layers']).__name__}")
        layers = {name: _layer_entry(name, e, where) for name, e in data["layers"].items()}
        for key, kinds, accepted in (("architecture", (str, type(None)), "a string or null"), ("family", (str, type(None)), "a string or null"),
                                     ("model_kwargs", (dict, type(None)), "a map"), ("recipe", (dict, type(None)), "a map or null"),
                                     ("source", (dict, type(None)), "a map or null"), ("latency", (dict, type(None)), "a map or null"),
                                     ("allocation", (dict, type(None)), "a map or null"),
                                     ("distill", (dict, type(None)), "a map or null"), ("lowrank_version", (str, type(None)), "a string"),
                                     ("weights_sha256", (str, type(None)), "a string or null")):
            if not isinstance(data.get(key), kinds):
                raise LowrankError(f"{where} '{key}' must be {accepted}, not {type(data.get(key)).__name__}")
        architecture = data.get("architecture")
        family = data.get("family") or ("timm" if architecture is not None else None)
        return cls(
            layers=layers, architecture=architecture, family=family, model_kwargs=dict(data.get("model_kwargs") or {}),
            recipe=data.get("recipe"), source=data.get("source"), latency=data.get("latency"), allocation=data.get("allocation"),
            distill=data.get("distill"),
            weights_sha256=data.get("weights_sha256"), format_version=version, lowrank_version=str(data.get("lowrank_version") or ""),
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )

    def check_tensors(self, header: CheckpointHeader) -> None:
        """Each factorized layer's tensors exist, are floating point, and have the shapes its entry gives."""
        t = header.tensors
        for name, e in self.layers.items():
            for key, shape in e.tensors(name).items():
                if key not in t:
                    raise LowrankError(f"{header.path}: manifest layer '{name}' has no tensor '{key}'")
                if t[key].shape != shape:
                    raise LowrankError(f"{header.path}: tensor '{key}' has shape {list(t[key].shape)}, but manifest layer '{name}' "
                                       f"(rank {e.rank}, d_in {e.d_in}, d_out {e.d_out}) needs {list(shape)}")
                if t[key].dtype not in FLOAT_DTYPES:
                    raise LowrankError(f"{header.path}: tensor '{key}' is stored as {t[key].dtype}; factorized weights are floating point ({', '.join(sorted(FLOAT_DTYPES))})")
            for stale in (f"{name}.weight", f"{name}.bias", f"{name}.down.bias", f"{name}.proj.bias"):
                if stale in t:
                    raise LowrankError(f"{header.path}: tensor '{stale}' should not exist: manifest layer '{name}' is factorized")

    def check_weights(self, tensors: dict[str, torch.Tensor], path: Any) -> None:
        """The tensors are those that were written (when the manifest records their digest)."""
        if self.weights_sha256 is not None and tensors_digest(tensors) != self.weights_sha256:
            raise LowrankError(f"{path}: its tensors differ from those written with its manifest (SHA-256 mismatch): "
                               "the file was modified or damaged")

    # -- applying -----------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Swap in empty `LowRankLinear`s / `LowRankEmbedding`s where the manifest says, so that a factorized state dict loads strictly."""
        for name, entry in self.layers.items():
            try:
                dense = model.get_submodule(name)
            except AttributeError:
                raise LowrankError(f"manifest layer '{name}' is not a module of the model") from None
            if entry.kind == "embedding":
                fits = isinstance(dense, nn.Embedding) and (dense.num_embeddings, dense.embedding_dim) == (entry.d_in, entry.d_out)
            else:
                fits = (isinstance(dense, nn.Linear) or is_conv1d(dense)) and linear_dims(dense) == (entry.d_in, entry.d_out)
            if not fits:
                raise LowrankError(f"manifest layer '{name}' ({entry.kind} {entry.d_in}→{entry.d_out}) does not match the model's {dense!r}")

        def empty(name: str, dense: nn.Module) -> nn.Module:
            e = self.layers[name]
            if e.kind == "embedding":
                return LowRankEmbedding(e.d_in, e.d_out, e.rank, padding_idx=dense.padding_idx)
            return LowRankLinear(e.d_in, e.d_out, e.rank, bias=e.bias)

        replace_modules(model, empty, named_in(self.layers))
        return model


def tied_once(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with a tied tensor (one storage under several names, e.g. an LM head tied to the word embeddings)
    kept once, under its first name, as transformers saves it; loading fills in the other names from the model's ties."""
    seen, out = set(), {}
    for key, value in state_dict.items():
        ident = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = value
    return out


def save_factorized(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], manifest: Manifest, *, force: bool = False,
                    inputs: tuple[str | os.PathLike, ...] = ()) -> Manifest:
    """Write a factorized checkpoint with its manifest, which records the digest of exactly these tensors; a tied
    tensor is written once (`tied_once`)."""
    state_dict = tied_once(state_dict)
    manifest = manifest.replace(weights_sha256=tensors_digest(state_dict))
    save_checkpoint(path, state_dict, manifest.metadata(), force=force, inputs=inputs)
    return manifest


def finish_factorized(writer: ShardWriter, manifest: Manifest) -> Manifest:
    """Write the shards a `ShardWriter` holds with the manifest, which records the digest of exactly the tensors written
    (one file's header holds it; several shards' index holds it in its `metadata`)."""
    manifest = manifest.replace(weights_sha256=writer.digest())
    writer.finish(manifest.metadata())
    return manifest


def read_checkpoint(path: str | os.PathLike) -> tuple[CheckpointHeader, Manifest | None, dict[str, torch.Tensor]]:
    """Header, manifest (validated against the tensors) and every tensor of a checkpoint, checked against the
    digest its manifest records: a file never loads with weights that differ from what was written."""
    header = read_header(path)
    manifest = Manifest.from_header(header)
    tensors = load_tensors(path)
    if manifest is not None:
        manifest.check_weights(tensors, path)
    return header, manifest, tensors
