"""Shared fixtures: tiny timm models and their safetensors checkpoints, and a CLI runner."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

os.environ.setdefault("COLUMNS", "200")  # Rich tables unwrapped in captured output

from lowrank_cli.cli.app import main  # noqa: E402
from lowrank_cli.data import calibration_batches  # noqa: E402
from lowrank_cli.io import Manifest, read_header  # noqa: E402
from lowrank_cli.measure import count_macs  # noqa: E402
from lowrank_cli.models import get_family  # noqa: E402
from lowrank_cli.plan import LatencySelection  # noqa: E402

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


def macs_of(model: torch.nn.Module):
    """`count_macs` of a timm model at batch 1, on the family's example inputs."""
    return count_macs(model, get_family("timm").example_inputs(model))


def manifest_of(path) -> dict | None:
    """The `lowrank` manifest of a checkpoint as a dict (None when it has none)."""
    m = Manifest.from_header(read_header(path))
    return None if m is None else m.to_dict()


def calibration(source: str, model: torch.nn.Module, n: int, batch: int):
    """`calibration_batches` at a timm model's input size."""
    return calibration_batches(source, get_family("timm").data_config(model), n, batch)


def latency_selection(model: torch.nn.Module, config, timer):
    """A `LatencySelection` with the token counts of a timm model's linears."""
    return LatencySelection(config, macs_of(model).linear_rows, timer)


def tiny_recipe(tmp_path: Path, **distill) -> Path:
    """A recipe for the tiny ViT on synthetic data: 2 epochs of 4 steps."""
    cfg = {"epochs": 2, "batch_size": 16, "lr": 1e-3, "warmup_epochs": 1, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 10, **distill}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS,
        "factorize": {"kappa": 3}, "data": {"source": "synthetic", "synthetic_size": 64, "num_workers": 0}, "distill": cfg,
    }))
    return path


def one_line_error(r, *needles, code=1):
    """Assert a CLI result is one `error: ...` line on stderr with the exit `code`, holding every needle; returns the line."""
    assert r.code == code, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY_VIT, pretrained=False, **TINY_VIT_KWARGS).eval()


@pytest.fixture
def vit_ckpt(tmp_path: Path) -> Path:
    """A tiny ViT's state dict as safetensors."""
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(path))
    return path


@pytest.fixture
def weights_ckpt(tmp_path: Path) -> Path:
    """A checkpoint of no timm architecture (BERT-like names): inspected and factorized weight-only."""
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "enc.safetensors"
    save_file({
        "embeddings.word_embeddings.weight": torch.randn(100, 64, generator=gen),
        "encoder.layer.0.attention.self.query.weight": torch.randn(64, 64, generator=gen),
        "encoder.layer.0.attention.self.query.bias": torch.randn(64, generator=gen),
        "encoder.layer.0.intermediate.dense.weight": torch.randn(256, 64, generator=gen),
        "encoder.layer.0.intermediate.dense.bias": torch.randn(256, generator=gen),
        "encoder.layer.0.output.dense.weight": torch.randn(64, 256, generator=gen),
        "encoder.layer.0.output.LayerNorm.weight": torch.ones(64),
    }, str(path))
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


@pytest.fixture(scope="session")
def real_checkpoints(tmp_path_factory):
    """`(family, dtype) -> folder` of the tiny checkpoints shaped like real ones (tests/fixtures_real.py), each built once."""
    from fixtures_real import CheckpointCache

    return CheckpointCache(tmp_path_factory.mktemp("real"))
