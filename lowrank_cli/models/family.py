"""The model-family seam: what depends on the library a model comes from, behind one interface.

Everything else in lowrank (planning, factorization, distillation, counting, export) asks a
`ModelFamily` for what it needs to know about a model: how to build it from an architecture
name and settings, which linears it has, which transformer blocks feature distillation
compares, example inputs (for MAC counting, calibration, export and benchmarks), how to call
it, how its data is prepared, its task (`models/tasks.py`: how it is trained and evaluated),
and how its folders are written. `timm` is the first family (`models/timm_family.py`).

Inputs are a tensor (images, `(B, C, H, W)`) or a mapping of tensors (a text model's
`input_ids` and `attention_mask`); `family.forward(model, inputs)` calls the model either way
and returns the tensor the model's task reads (logits, or the last hidden states).
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Mapping, Union

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.safetensors import CheckpointHeader
from lowrank_cli.models.generation import Decoder
from lowrank_cli.models.tasks import Task, get_task
from lowrank_cli.nn.lowrank import LowRankLinear

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class Candidate:
    """A linear layer (or a 2-D weight) that could be factorized; `skip` says why not when it cannot be."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    skip: str | None = None
    kind: str = "linear"  # linear, conv1d (GPT-2's transposed linear), embedding (d_in = rows, d_out = width)


@dataclass(frozen=True)
class ImageConfig:
    """How a vision model's images are prepared: `(C, H, W)`, per-channel mean/std, resizing."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    modality: ClassVar[str] = "images"  # how `data.modality` loads its data


@dataclass(frozen=True)
class TextConfig:
    """How a text model's data is prepared: tokenized with the checkpoint's own tokenizer, truncated to
    `max_length` tokens; `task` says what its output is (`features`, `classification`, `causal-lm`, ...)."""

    max_length: int
    task: str = "features"
    num_labels: int | None = None
    modality: ClassVar[str] = "text"  # how `data.modality` loads its data


def linear_candidates(model: nn.Module) -> list[Candidate]:
    """Every `nn.Linear` of a model, with the ones that must not be replaced marked.

    The `down`/`up` halves of an already factorized layer are not candidates.
    """
    out: list[Candidate] = []
    holders = _shared(model)
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.Linear):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(parent, LowRankLinear):
            continue
        skip = None
        tied = [n for n in holders.get(id(module.weight), []) if n != name]
        if isinstance(parent, nn.MultiheadAttention):
            skip = "part of an nn.MultiheadAttention, which uses its weight directly"
        elif type(module) is not nn.Linear:
            skip = f"a subclass of nn.Linear ({type(module).__name__}), not replaced"
        elif tied:
            skip = f"tied to '{tied[0]}' (its weights are shared): stays dense"
        out.append(Candidate(name, module.in_features, module.out_features, module.bias is not None, skip))
    return out


def _shared(model: nn.Module) -> dict[int, list[str]]:
    """For each parameter tensor, the modules that hold it (more than one: tied weights)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    return holders


def fill_tied(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with each of `model`'s tied tensors (one storage under several names, e.g. an LM head tied to the
    word embeddings) under every one of its names, from whichever name is present: a checkpoint stores a tied tensor once."""
    groups: dict[tuple, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if value.is_meta:  # no storage to compare: a tied parameter is one object under several names
            groups.setdefault(("meta", id(value)), []).append(key)
        elif value.numel():
            groups.setdefault((value.data_ptr(), value.dtype, tuple(value.shape), value.stride()), []).append(key)
    out = dict(state_dict)
    for keys in groups.values():
        present = [k for k in keys if k in out]
        if present and len(keys) > 1:
            for k in keys:
                out.setdefault(k, out[present[0]])
    return out


def embedding_candidates(model: nn.Module) -> list[Candidate]:
    """Every `nn.Embedding` table (d_in = rows, d_out = width); one tied to another module (an LM head) is marked."""
    holders = _shared(model)
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Embedding:
            continue
        others = [n for n in holders.get(id(module.weight), []) if n != name]
        skip = f"tied to '{others[0]}' (its weights are shared): stays dense" if others else None
        out.append(Candidate(name, module.num_embeddings, module.embedding_dim, False, skip, kind="embedding"))
    return out


def model_classes(model: nn.Module) -> int | None:
    """The number of classes a classifier outputs (timm: `num_classes`; transformers: `config.num_labels`)."""
    classes = getattr(model, "num_classes", None)
    if classes is None and hasattr(model, "config") and type(model).__name__.endswith("Classification"):
        classes = getattr(model.config, "num_labels", None)
    return classes


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """`model(x)` for a tensor, `model(**inputs)` for a mapping (works through DDP wrappers too)."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def inputs_to(inputs: Inputs, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> Inputs:
    """Move a batch's inputs to `device`; `dtype` applies to floating-point tensors only."""

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype=dtype if dtype is not None and t.is_floating_point() else None, non_blocking=non_blocking)

    return {k: move(v) for k, v in inputs.items()} if isinstance(inputs, Mapping) else move(inputs)


def batch_size(inputs: Inputs) -> int:
    """The number of examples in a batch of inputs."""
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    return int(first.shape[0])


class ModelFamily(ABC):
    """What lowrank needs to know about one library's models (see the module docstring)."""

    name: ClassVar[str]

    @abstractmethod
    def create(self, architecture: str, kwargs: dict[str, Any]) -> nn.Module:
        """The architecture with random weights (no download), or a LowrankError naming what is wrong."""

    def complete_kwargs(self, architecture: str, header: CheckpointHeader | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` plus the settings a checkpoint's tensors imply (e.g. a classifier's number of classes)."""
        return dict(kwargs)

    def recorded_kwargs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The settings to record in a manifest so that the model can be rebuilt."""
        return dict(kwargs)

    def linear_candidates(self, model: nn.Module) -> list[Candidate]:
        """The layers factorization may replace."""
        return linear_candidates(model)

    def embedding_candidates(self, model: nn.Module) -> list[Candidate]:
        """The embedding tables factorization may replace (`factorize.embeddings`)."""
        return embedding_candidates(model)

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The transformer blocks, in forward order, whose outputs feature distillation compares."""

    def block_links(self, model: nn.Module) -> list[nn.Module | None]:
        """For each block, the module the model applies to the previous block's output to make its input (None:
        the output itself); `models.blocks.BlockRunner` checks on real data that the blocks chain this way."""
        return [None] * len(self.blocks(model))

    @abstractmethod
    def example_inputs(self, model: nn.Module, batch: int = 1, *, generator: torch.Generator | None = None, seq_len: int | None = None) -> Inputs:
        """Random inputs of the model's own size (`seq_len` tokens for a text model), on the CPU, for counting,
        calibration checks, export and timing."""

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """Call the model and return the tensor its task reads (logits for classifiers)."""
        return call_model(model, inputs)

    @abstractmethod
    def data_config(self, model: nn.Module) -> ImageConfig | TextConfig:
        """How the model's data is prepared."""

    def adapt_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors as this model expects them (e.g. without buffers it now computes itself)."""
        return state_dict

    def task(self, model: nn.Module) -> Task:
        """What the model's output is for (`models.tasks`): `image-classification` for timm's models."""
        return get_task("image-classification")

    def max_positions(self, model: nn.Module) -> int | None:
        """The longest input a text model takes (None for images)."""
        return None

    def text_length(self, model: nn.Module, seq_len: int | None) -> int | None:
        """The tokens per example a text model is counted and timed at (`seq_len`, else its data config's); None for
        a model that takes images (where `seq_len` is a LowrankError)."""
        cfg = self.data_config(model)
        if cfg.modality != "text":
            if seq_len is not None:
                raise LowrankError(f"seq_len applies to text models; {type(model).__name__} takes images", param="seq_len")
            return None
        length = seq_len or cfg.max_length
        limit = self.max_positions(model)
        if limit is not None and length > limit:
            raise LowrankError(f"seq_len {length} is above the model's maximum of {limit} positions", param="seq_len")
        return length

    def example_at(self, model: nn.Module, seq_len: int | None = None, batch: int = 1) -> Inputs:
        """`example_inputs`, at `seq_len` tokens for a text model (checked against its positions)."""
        return self.example_inputs(model, batch, seq_len=self.text_length(model, seq_len))

    def write_hub_files(self, folder: Path, architecture: str, model_kwargs: dict[str, Any], source: Path | None) -> bool:
        """Make `folder` (a factorized checkpoint's or a run's) the model's Hub folder: its `config.json` from the recorded
        settings, and the tokenizer and usage files of `source`. False, writing nothing, where the family's models are
        not Hub folders (timm: a file)."""
        return False

    def load_instructions(self, architecture: str, where: str, model_kwargs: dict[str, Any]) -> str:
        """How a user loads a dense export at `where` with the family's own library (a line of code)."""
        return f"load {where} into {architecture} with strict=True"

    def load_pretrained(self, folder: Path, architecture: str, kwargs: dict[str, Any]) -> nn.Module | None:
        """A plain (not factorized) checkpoint of a Hub folder loaded by the library's own loader, or None where
        lowrank's strict load of the tensors is the library's way (timm)."""
        return None

    def load_dense(self, where: Path, architecture: str, kwargs: dict[str, Any] | None = None, *, dtype: torch.dtype | None = None) -> nn.Module:
        """A dense export loaded back the way the library loads it (strictly), in `dtype` when given, in eval mode."""
        raise LowrankError(f"{self.name} models are not exported as folders", param="format")

    def dense_export_is_folder(self) -> bool:
        """Whether a dense export is the library's own folder (`save_dense`), not one state-dict file."""
        return False

    def save_dense(self, model: nn.Module, folder: Path, max_shard_size: int | str | None = None) -> None:
        """A dense model written as the library's own folder (config, weights in the model's dtype, shards of at most
        `max_shard_size` bytes)."""
        raise LowrankError(f"{self.name} models are not exported as folders", param="format")

    def architecture_for(self, config: dict[str, Any]) -> str:
        """The architecture a Hub `config.json` names."""
        raise LowrankError(f"{self.name} models are not named by a config.json", param="model")

    def decoder(self, model: nn.Module) -> Decoder:
        """The model as a `Decoder` (greedy generation with a KV cache), or a LowrankError where it does not generate."""
        raise LowrankError(f"{type(model).__name__} ({self.name}) does not generate text; generation is timed for causal LMs "
                           "(transformers models whose task is causal-lm)", param="generate")

    def exportable(self) -> ContextManager[None]:
        """A context in which models are built in their export-friendly form (for ONNX)."""
        return contextlib.nullcontext()


def _timm_vision(header: CheckpointHeader) -> bool:
    """timm's vision transformers embed patches with `patch_embed.proj`, a convolution (4-D weight)."""
    return any(k.removeprefix("module.") == "patch_embed.proj.weight" and len(v.shape) == 4 for k, v in header.tensors.items())


# The families, by name: the module that implements each, imported when first used so that a
# command that needs no model (or another family) does not pay for the library's import, and a
# test of a checkpoint's header, needing no import, for whether its tensors look like the family's.
FAMILIES = {"timm": "lowrank_cli.models.timm_family", "transformers": "lowrank_cli.models.hf_family"}
EXTRAS = {"transformers": "pip install 'lowrank[hf]' (transformers and tokenizers)"}
RECOGNIZERS: dict[str, Callable[[CheckpointHeader], bool]] = {"timm": _timm_vision}


def get_family(name: str) -> ModelFamily:
    """The family called `name` (`timm`), or a LowrankError listing those there are."""
    module = FAMILIES.get(name)
    if module is None:
        raise LowrankError(f"model family '{name}' is not supported; accepted: {', '.join(FAMILIES)}", param="family")
    try:
        return importlib.import_module(module).FAMILY
    except ImportError as e:
        raise LowrankError(f"{name} models need their library ({e.name or e}): {EXTRAS.get(name, 'install it')}") from None


def recognizes(name: str, header: CheckpointHeader) -> bool:
    """Whether a checkpoint's tensors look like those of family `name`'s models (worth searching for an architecture)."""
    return RECOGNIZERS.get(name, lambda _h: False)(header)
