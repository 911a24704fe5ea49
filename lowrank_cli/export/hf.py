"""A factorized transformers model as a Hub folder that stock transformers loads without lowrank (`export --format hf`).

The folder holds the factors, not the dense weights: `model.safetensors` keeps each factorized layer's `down`/`up`
(or an embedding's `lookup`/`proj`) tensors under the base architecture's names, as the factorized checkpoint does.
Stock transformers builds that model through `modeling_lowrank.py`, written into the folder: the package data file
`hf_modeling/modeling_lowrank.py` (a `LowRankLinear`, a `LowRankEmbedding` and the swap, in torch and transformers
only) followed by this model's classes, each a subclass of its transformers class that makes the layers named in the
config's `lowrank_layers` low-rank in `post_init`, before `from_pretrained` ties weights and loads the checkpoint.

The config is the base model's, with a model_type of its own (`lowrank_llama`: without `trust_remote_code` transformers
refuses the folder instead of building the dense model with random weights), `architectures`, `auto_map` (the config
class and, for each Auto class that loads the base architecture or its base model, the subclass) and `lowrank_layers`.

`load_folder` loads such a folder in this process the way a user does (`from_pretrained(..., trust_remote_code=True)`),
with transformers' copy of the remote code kept in a temporary folder and forgotten afterwards.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.manifest import LayerEntry, Manifest
from lowrank_cli.io.safetensors import DEFAULT_SHARD_SIZE, shard_bytes, shard_writer
from lowrank_cli.models.family import fill_tied

FAMILY = "transformers"  # the only family whose models are Hub folders transformers builds
MODELING_FILE = "modeling_lowrank.py"
TEMPLATE = Path(__file__).resolve().parent / "hf_modeling" / MODELING_FILE
MARKER = "# ---- the classes of this model (written by lowrank export) ----"
LAYERS_KEY = "lowrank_layers"
LAST_AUTOS = ("AutoModelForPreTraining", "AutoModelForTextEncoding")  # loaded by these too, but not what a user asks first


def require_transformers(path: Path, manifest: Manifest) -> None:
    """A LowrankError unless the checkpoint is a factorized transformers model (a Hub folder's model)."""
    if manifest.family != FAMILY:
        raise LowrankError(f"{path}: format hf writes a Hub folder for transformers models; this checkpoint's family is "
                           f"{manifest.family or 'unknown'}; accepted for it: onnx, dense, safetensors", param="format")


@dataclass(frozen=True)
class HfClasses:
    """The transformers classes the exported model is built on, and what the folder calls its own subclasses."""

    model_type: str  # the base config's (`llama`)
    config: str  # its config class (`LlamaConfig`)
    architecture: str  # the factorized model's class (`LlamaForCausalLM`)
    base: str | None  # its base model's class when that is another (`LlamaModel`), else None
    prefix: str  # the base model's attribute and a dot (`model.`): its layers' names start with it
    autos: dict[str, str] = field(default_factory=dict)  # Auto class -> the transformers class it builds here

    @property
    def own_model_type(self) -> str:
        return f"lowrank_{self.model_type}"

    @staticmethod
    def own(name: str) -> str:
        """The folder's subclass of a transformers class: `LowRank<name>`."""
        return f"LowRank{name}"

    def auto_map(self) -> dict[str, str]:
        module = MODELING_FILE.removesuffix(".py")
        return {"AutoConfig": f"{module}.{self.own(self.config)}", **{a: f"{module}.{self.own(c)}" for a, c in self.autos.items()}}

    def main_auto(self) -> str:
        """The Auto class that loads the architecture itself (AutoModelForCausalLM before AutoModelForPreTraining)."""
        autos = sorted((a for a, c in self.autos.items() if c == self.architecture), key=lambda a: (a in LAST_AUTOS, a))
        return autos[0]


def _transformers_class(obj: type, what: str) -> str:
    import transformers

    name = obj.__name__
    if getattr(transformers, name, None) is not obj:
        raise LowrankError(f"the {what} class {obj.__module__}.{name} is not one transformers exports by name, which the "
                           "folder's code needs; accepted: the transformers model classes (e.g. LlamaForCausalLM, BertModel)")
    return name


def hf_classes(model: nn.Module) -> HfClasses:
    """The classes of a transformers model built from a factorized checkpoint's config (random or empty weights), and the
    Auto classes that build its architecture or its base model for its model_type."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    architecture = _transformers_class(type(model), "model")
    config = _transformers_class(type(model.config), "config")
    model_type = model.config.model_type
    base_model = model.base_model
    base = _transformers_class(type(base_model), "base model") if base_model is not model else None
    autos = {}
    for name, auto in sorted(vars(modeling_auto).items()):
        if not (isinstance(auto, type) and issubclass(auto, _BaseAutoModelClass) and getattr(auto, "_model_mapping", None) is not None):
            continue
        names = auto._model_mapping._model_mapping.get(model_type)
        names = (names,) if isinstance(names, str) else tuple(names or ())
        for cls in (architecture, base):
            if cls is not None and cls in names:
                autos[name] = cls
    if architecture not in autos.values():
        raise LowrankError(f"{architecture}: no transformers Auto class loads it for model_type '{model_type}', so a Hub folder "
                           "cannot name it in its auto_map; accepted: the classes transformers' Auto classes build")
    return HfClasses(model_type, config, architecture, base, f"{model.base_model_prefix}." if base else "", autos)


def modeling_source(classes: HfClasses) -> str:
    """`modeling_lowrank.py` of the folder: the template and this model's config and model classes."""
    text = TEMPLATE.read_text(encoding="utf-8")
    head, marker, _ = text.partition(MARKER)
    if not marker:
        raise LowrankError(f"{TEMPLATE}: the line '{MARKER}' is missing: the lowrank installation is damaged")
    own_config = classes.own(classes.config)
    blocks = [
        f"class {own_config}(transformers.{classes.config}):\n"
        f'    """{classes.config} with a model_type of its own: transformers needs trust_remote_code to load this folder, and\n'
        f'    keeps `{LAYERS_KEY}` (the factorized layers) as an attribute."""\n\n'
        f'    model_type = "{classes.own_model_type}"\n'
        f"    base_model_tp_plan = None  # the base's tensor-parallel plan names dense layers that are low-rank here\n",
        f"class {classes.own(classes.architecture)}(LowRankMixin, transformers.{classes.architecture}):\n"
        f"    config_class = {own_config}\n",
    ]
    if classes.base is not None:
        blocks.append(f"class {classes.own(classes.base)}(LowRankMixin, transformers.{classes.base}):\n"
                      f"    config_class = {own_config}\n"
                      f'    lowrank_prefix = "{classes.prefix}"  # the layers\' names in {classes.architecture} start with it\n')
    return head + marker + "\n\n\n" + "\n\n".join(blocks)


def layer_records(layers: dict[str, LayerEntry]) -> dict[str, dict[str, Any]]:
    """`lowrank_layers`: what the folder's code needs of each factorized layer."""
    return {name: {"rank": e.rank, "d_in": e.d_in, "d_out": e.d_out, "bias": e.bias, "kind": e.kind} for name, e in layers.items()}


def hf_config(model_kwargs: dict[str, Any], layers: dict[str, LayerEntry], classes: HfClasses, dtype: str) -> dict[str, Any]:
    """`config.json`: the base model's config under the folder's own model_type and classes, with the factorized layers."""
    return {**model_kwargs, "model_type": classes.own_model_type, "architectures": [classes.own(classes.architecture)],
            "auto_map": classes.auto_map(), LAYERS_KEY: layer_records(layers), "dtype": dtype}


def write_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The tensors as transformers' weight files (`model.safetensors`, or shards of at most 5GB with their index)."""
    with shard_writer(folder, shard_bytes(DEFAULT_SHARD_SIZE)) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.finish({})


def write_folder(folder: Path, source: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Write the weights, `config.json` and `modeling_lowrank.py` (`source`) into `folder`; the weight files' names."""
    files = write_weights(folder, tensors)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / MODELING_FILE).write_text(source, encoding="utf-8")
    return files


@contextlib.contextmanager
def remote_code_cache() -> Iterator[Path]:
    """transformers' copies of remote code (`HF_MODULES_CACHE`) in a temporary folder for the block: nothing of a folder
    being verified stays in the user's cache, on `sys.path` or in `sys.modules`."""
    from transformers import dynamic_module_utils as dmu

    old, before = dmu.HF_MODULES_CACHE, set(sys.modules)
    tmp = tempfile.mkdtemp(prefix="lowrank-hf-modules-")
    dmu.HF_MODULES_CACHE = tmp
    try:
        yield Path(tmp)
    finally:
        dmu.HF_MODULES_CACHE = old
        for name in set(sys.modules) - before:
            if name.startswith(dmu.TRANSFORMERS_DYNAMIC_MODULE_NAME):
                del sys.modules[name]
        with contextlib.suppress(ValueError):
            sys.path.remove(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def load_folder(folder: Path, auto_class: str) -> tuple[nn.Module, dict[str, list[str]]]:
    """`transformers.<auto_class>.from_pretrained(folder, trust_remote_code=True)` (in the config's dtype) and its loading
    info, within `remote_code_cache`; a LowrankError naming the folder when transformers cannot load it."""
    import transformers

    with remote_code_cache():
        try:
            model, info = getattr(transformers, auto_class).from_pretrained(str(folder), trust_remote_code=True, local_files_only=True,
                                                                           output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a folder it cannot load
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise LowrankError(f"{folder}: {auto_class}.from_pretrained(trust_remote_code=True) fails ({type(e).__name__}: {text}); "
                               "nothing was written") from None
    return model.eval(), {k: [str(x) for x in v] for k, v in info.items() if isinstance(v, (list, set, tuple))}


def require_clean_load(info: dict[str, list[str]], what: str) -> None:
    """A LowrankError when `from_pretrained`'s loading info lists a missing, unexpected or mismatched key."""
    labels = {"missing_keys": "missing keys", "unexpected_keys": "unexpected keys", "mismatched_keys": "shape mismatches"}
    bad = [(labels[k], sorted(v)) for k, v in info.items() if k in labels and v]
    if bad:
        parts = "; ".join(f"{len(v)} {label} ({', '.join(v[:4])}{', ...' if len(v) > 4 else ''})" for label, v in bad)
        raise LowrankError(f"{what}: transformers' load reports {parts}; nothing was written")


def hub_id(name: Any) -> str | None:
    """`name` when it reads as a Hub repository id (`owner/name`), else None."""
    return name if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) else None


def require_written_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """A LowrankError unless the loaded model's state dict is exactly the tensors written (a tied one under each of its
    names): nothing of it was initialized at random, renamed, dropped or cast on the way in."""
    want = fill_tied(model, tensors)
    got = model.state_dict()
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise LowrankError(f"{what}: the loaded model's tensors are not those written (not written: {', '.join(extra[:4]) or 'none'}; "
                           f"not loaded: {', '.join(missing[:4]) or 'none'}); nothing was written")
    for name in sorted(want):
        if got[name].dtype != want[name].dtype or not torch.equal(got[name].cpu(), want[name]):
            raise LowrankError(f"{what}: tensor '{name}' was loaded as {got[name].dtype} {list(got[name].shape)} but written as "
                               f"{want[name].dtype} {list(want[name].shape)} with other values; nothing was written")

