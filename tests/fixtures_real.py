"""Tiny checkpoints shaped like the real ones users bring (issue 17), on disk as they are released, for CI.

- `llama`: a Llama-style causal LM with grouped-query attention (4 heads, 2 key/value heads) and an LM head tied
  to its embeddings, in a Hub folder sharded with its index, with a chat template (`chat_template.jinja`);
- `gpt2`: GPT-2 (its linears are `Conv1D`s, weights stored transposed), LM head tied;
- `bert`: BERT with a pooler and a sequence classifier (`BertForSequenceClassification`);
- `hf-vit`: Hugging Face's ViT for image classification;
- `deit`: timm's distilled DeiT (a class and a distillation token, two heads), a timm Hub folder;
- `swin`: timm's Swin (windowed attention, patch merging), a timm Hub folder.

Each in fp32 or bf16 (`dtype`): a bf16 checkpoint is written in bf16, as real releases are. Random weights (the causal
LMs trained a few steps, so that their top-1 predictions are not near-ties), no download; text models carry tokenizers trained here on Python's own docstrings (`hf_models`).
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from conftest import TINY_SWIN, TINY_SWIN_KWARGS
from hf_models import hub_model
from safetensors.torch import save_file

TINY_DEIT = "deit_tiny_distilled_patch16_224"
TINY_DEIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
TIMM = {"deit": (TINY_DEIT, TINY_DEIT_KWARGS), "swin": (TINY_SWIN, TINY_SWIN_KWARGS)}
HUB = {"llama": "llama-tied", "gpt2": "gpt2", "bert": "bert-cls", "hf-vit": "vit"}
FAMILIES = ("llama", "gpt2", "bert", "hf-vit", "deit", "swin")
TEXT = ("llama", "gpt2", "bert")  # tokenizers, text data, embedding tables
SHARD_BYTES = 60_000  # the tiny Llama's fp32 weights are ~150 kB: 3 shards (2 in bf16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LM_PRETRAIN_STEPS = 150  # causal LMs: confident next-token logits, as a released model's (hf_models.pretrain_lm)


def timm_folder(root: Path, family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A timm Hub folder: `model.safetensors` and a `config.json` naming the architecture, its classes and settings."""
    arch, kwargs = TIMM[family]
    folder = root / family
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval().to(dtype)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    args = {k: v for k, v in kwargs.items() if k != "num_classes"}
    (folder / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": kwargs["num_classes"], "model_args": args}))
    return folder


def real_checkpoint(root: Path, family: str, dtype: str = "fp32") -> Path:
    """The folder of a tiny `family` checkpoint (see the module's docstring) in `dtype` ('fp32' or 'bf16'), under `root`."""
    torch_dtype = DTYPES[dtype]
    if family in TIMM:
        return timm_folder(root, family, torch_dtype)
    shards = SHARD_BYTES if family == "llama" else None
    steps = LM_PRETRAIN_STEPS if family in ("llama", "gpt2") else 0
    return hub_model(root, HUB[family], dtype=None if dtype == "fp32" else torch_dtype, max_shard_size=shards, name=family, pretrain_steps=steps)


class CheckpointCache:
    """Each (family, dtype) checkpoint built once, on first use, under one root (a session's fixtures share it)."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[tuple[str, str], Path] = {}

    def __call__(self, family: str, dtype: str = "fp32") -> Path:
        key = (family, dtype)
        if key not in self._built:
            self._built[key] = real_checkpoint(self.root / dtype, family, dtype)
        return self._built[key]
