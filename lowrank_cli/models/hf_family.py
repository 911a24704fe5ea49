"""Hugging Face `transformers` models behind the family seam: BERT-family encoders (BERT, RoBERTa,
DistilBERT), ViT, and causal LMs (GPT-2 with its transposed `Conv1D`, Llama-style `nn.Linear`).

A model is named by its transformers class (`BertModel`, `GPT2LMHeadModel`, ...) and built from
its config (`config.json`'s content, recorded whole in a manifest): nothing is downloaded.
`transformers` is an optional dependency (`pip install 'lowrank[hf]'`); this module is imported
only when a checkpoint needs it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.hub import copy_side_files, write_config
from lowrank_cli.models.family import (Candidate, ImageConfig, Inputs, ModelFamily, TextConfig, call_model, embedding_candidates, fill_tied,
                                       linear_candidates)
from lowrank_cli.models.generation import CachedDecoder, Decoder
from lowrank_cli.models.tasks import Task, get_task
from lowrank_cli.nn.lowrank import is_conv1d

# from_pretrained's dtype argument: `dtype` since transformers 4.56 (`torch_dtype` before)
_DTYPE_ARG = "dtype" if tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2]) >= (4, 56) else "torch_dtype"
transformers.logging.set_verbosity_error()  # its config warnings and progress bars would break the one-line output of the CLI
transformers.logging.disable_progress_bar()

# What a model does, from its class name: the task (`models.tasks`) that says how it is evaluated and trained.
CLASS_TASKS = (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("ForSequenceClassification", "classification"),
         ("ForImageClassification", "image-classification"), ("ForMaskedLM", "masked-lm"))
VISION_TYPES = {"vit", "deit", "beit", "dinov2", "vit_msn", "vit_mae"}
DEFAULT_SEQ_LEN = 128
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl", "data2vec-text"}
# keys that older transformers versions saved and current ones compute (non-persistent buffers)
_COMPUTED = re.compile(r"(^|\.)(position_ids|attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


def config_from(kwargs: dict[str, Any], source: str = "config") -> PretrainedConfig:
    """A transformers config from its dict (`config.json`'s content), or a LowrankError naming the model_type."""
    data = dict(kwargs)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = ", ".join(sorted(t for t in ("bert", "roberta", "distilbert", "vit", "gpt2", "llama")))
        raise LowrankError(f"{source}: model_type {model_type!r} is not one transformers {transformers.__version__} knows "
                           f"(e.g. {close})", param="model")
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as e:  # noqa: BLE001 - a config rejects bad values in many ways
        raise LowrankError(f"{source}: not a valid {model_type} config ({type(e).__name__}: {e})", param="model_kwargs") from None


def default_architecture(config: dict[str, Any]) -> str:
    """The class a config names (`architectures[0]`), else its model_type's base model (`BertModel`)."""
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = config.get("model_type")
    name = MODEL_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    if name is None:
        raise LowrankError(f"config: no 'architectures' and no base model for model_type {model_type!r}", param="model")
    return name


class HFFamily(ModelFamily):
    name = "transformers"

    def create(self, architecture: str, kwargs: dict[str, Any]) -> nn.Module:
        cls = getattr(transformers, architecture, None)
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise LowrankError(f"'{architecture}' is not a transformers model class (e.g. BertModel, GPT2LMHeadModel, ViTModel)", param="model")
        config = config_from(kwargs, f"the config of {architecture}")
        try:
            return cls(config).eval()
        except Exception as e:  # noqa: BLE001 - a model constructor fails in many ways for a config that does not fit it
            raise LowrankError(f"{architecture} cannot be built from its config ({type(e).__name__}: {e})", param="model_kwargs") from None

    def architecture_for(self, config: dict[str, Any]) -> str:
        return default_architecture(config)

    def load_pretrained(self, folder: Path, architecture: str, kwargs: dict[str, Any]) -> nn.Module:
        """`<architecture>.from_pretrained(folder)`: transformers' own loader (it renames keys of older checkpoints,
        ties weights), strict: a missing, unexpected or mismatched key is a LowrankError naming them."""
        return self.load_dense(folder, architecture, kwargs)

    def load_dense(self, where: Path, architecture: str, kwargs: dict[str, Any] | None = None, *, dtype: torch.dtype | None = None) -> nn.Module:
        """`<architecture>.from_pretrained(folder)` (local files only), in `dtype` when given; missing or
        unexpected keys are a LowrankError."""
        cls = getattr(transformers, architecture, None)
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise LowrankError(f"'{architecture}' is not a transformers model class (e.g. BertModel, GPT2LMHeadModel, ViTModel)", param="model")
        extra = {"config": config_from(kwargs, f"{where}/config.json")} if kwargs else {}
        if dtype is not None:
            extra[_DTYPE_ARG] = dtype
        try:
            model, info = cls.from_pretrained(str(where), local_files_only=True, output_loading_info=True, **extra)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a folder it cannot load
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise LowrankError(f"{where}: {architecture}.from_pretrained fails ({type(e).__name__}: {text})") from None
        labels = {"missing_keys": "missing keys", "unexpected_keys": "unexpected keys", "mismatched_keys": "shape mismatches"}
        bad = [(labels[k], [str(x) for x in v]) for k, v in info.items() if k in labels and v]
        if bad:
            parts = "; ".join(f"{len(v)} {label} ({', '.join(sorted(v)[:4])}{', ...' if len(v) > 4 else ''})" for label, v in bad)
            raise LowrankError(f"{where} does not match architecture '{architecture}': {parts}", param="model")
        return model.eval()

    def dense_export_is_folder(self) -> bool:
        return True

    def write_hub_files(self, folder: Path, architecture: str, model_kwargs: dict[str, Any], source: Path | None) -> bool:
        """`config.json` (the recorded config, naming `architecture`) and `source`'s tokenizer and usage files: the folder
        is again a Hub folder."""
        write_config(folder, {**model_kwargs, "architectures": [architecture]})
        copy_side_files(source, folder)
        return True

    def load_instructions(self, architecture: str, where: str, model_kwargs: dict[str, Any]) -> str:
        return f"load with transformers.{architecture}.from_pretrained('{where}')"

    def save_dense(self, model: nn.Module, folder: Path, max_shard_size: int | str | None = None) -> None:
        """`model.save_pretrained(folder)`: config (with the weights' dtype), weights (tied ones once), in shards of at most
        `max_shard_size` (bytes, or a size such as `"500MB"`; transformers' default otherwise) with their index."""
        model.save_pretrained(str(folder), **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))

    def recorded_kwargs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The whole config: a factorized checkpoint rebuilds its model with no file beside it."""
        config = model.config.to_dict()
        for noise in ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype", "_attn_implementation_autoset"):
            config.pop(noise, None)
        return config

    def adapt_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint as the model expects it: without the buffers older transformers saved and the model now computes
        itself (`position_ids`, GPT-2's `attn.bias`), and with a tied weight saved once (an LM head) under each of its names."""
        expected = model.state_dict()
        out = {k: v for k, v in state_dict.items() if k in expected or not _COMPUTED.search(k)}
        return fill_tied(model, out)

    def task(self, model: nn.Module) -> Task:
        """`causal-lm`, `classification`, `image-classification`, `masked-lm`, or `features` (a base model's hidden states)."""
        name = type(model).__name__
        return get_task(next((task for suffix, task in CLASS_TASKS if name.endswith(suffix)), "features"))

    def is_vision(self, model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) in VISION_TYPES

    def linear_candidates(self, model: nn.Module) -> list[Candidate]:
        out = linear_candidates(model)
        holders = {}
        for name, module in model.named_modules():
            for p in module.parameters(recurse=False):
                holders.setdefault(id(p), []).append(name)
        for name, module in model.named_modules():  # GPT-2's Conv1D: a linear with its weight transposed
            if is_conv1d(module):
                d_in, d_out = module.weight.shape
                tied = [n for n in holders.get(id(module.weight), []) if n != name]
                skip = f"tied to '{tied[0]}' (its weights are shared): stays dense" if tied else None
                out.append(Candidate(name, int(d_in), int(d_out), module.bias is not None, skip, kind="conv1d"))
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        return sorted(out, key=lambda c: order[c.name])

    def embedding_candidates(self, model: nn.Module) -> list[Candidate]:
        return embedding_candidates(model)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The layers of the model's stack: the module list as long as its `num_hidden_layers`, the shallowest one."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n = getattr(config, "num_hidden_layers", None)
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n and n:
                return [(f"{name}.{i}", m) for i, m in enumerate(module)]
        raise LowrankError(f"{type(model).__name__}: no stack of {n} layers found for feature distillation")

    def decoder(self, model: nn.Module) -> Decoder:
        if not self.task(model).language_model:
            return super().decoder(model)
        return CachedDecoder(model)

    def max_positions(self, model: nn.Module) -> int | None:
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit and config.model_type in OFFSET_POSITIONS and config.pad_token_id is not None:
            limit -= config.pad_token_id + 1  # RoBERTa-style positions start after the padding index
        return limit

    def example_inputs(self, model: nn.Module, batch: int = 1, *, generator: torch.Generator | None = None, seq_len: int | None = None) -> Inputs:
        config = model.config
        if self.is_vision(model):
            size = config.image_size
            return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=generator)}
        limit = self.max_positions(model) or DEFAULT_SEQ_LEN
        length = min(seq_len or DEFAULT_SEQ_LEN, limit)
        low = min(5, config.vocab_size - 1)  # past the usual special ids
        ids = torch.randint(low, config.vocab_size, (batch, length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.long)}

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        if self.task(model).language_model and isinstance(inputs, dict):  # no KV cache: nothing is generated
            inputs = {**inputs, "use_cache": False}
        out = call_model(model, inputs)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state

    def data_config(self, model: nn.Module) -> ImageConfig | TextConfig:
        config = model.config
        if self.is_vision(model):
            mean = tuple(getattr(config, "image_mean", None) or (0.5,) * config.num_channels)
            std = tuple(getattr(config, "image_std", None) or (0.5,) * config.num_channels)
            return ImageConfig((config.num_channels, config.image_size, config.image_size), mean, std, "bilinear", 1.0)
        return TextConfig(max_length=min(DEFAULT_SEQ_LEN, self.max_positions(model) or DEFAULT_SEQ_LEN), task=self.task(model).name,
                          num_labels=getattr(config, "num_labels", None) if self.task(model).name == "classification" else None)


FAMILY = HFFamily()
