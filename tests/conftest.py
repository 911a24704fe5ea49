"""Shared fixtures: tiny timm models and their safetensors checkpoints, and a CLI runner."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

os.environ.setdefault("COLUMNS", "200")  # Rich tables unwrapped in captured output

from lowrank_cli.cli import main  # noqa: E402

TINY_VIT = "vit_tiny_patch16_224"
TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 10}
TINY_SWIN = "swin_tiny_patch4_window7_224"
TINY_SWIN_KWARGS = {"img_size": 56, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 7, "num_classes": 10}


def model_args(kwargs: dict) -> list[str]:
    """`--model-arg` options for a kwargs dict."""
    out = []
    for k, v in kwargs.items():
        out += ["--model-arg", f"{k}={v}"]
    return out


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS).eval()


@pytest.fixture
def vit_ckpt(tmp_path: Path) -> Path:
    """A tiny ViT's state dict as safetensors."""
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(path))
    return path


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run `lowrank ARGS...` in-process, as the console script does; returns code, stdout, stderr."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
