"""The model-family seam, with timm as its family."""

import pytest
import torch
from conftest import TINY_SWIN, TINY_SWIN_KWARGS, TINY_VIT, TINY_VIT_KWARGS

from lowrank_cli.errors import LowrankError
from lowrank_cli.models import build_model, get_family


def test_timm_family_blocks_inputs_and_data_config():
    timm_family = get_family("timm")
    vit = timm_family.create(TINY_VIT, TINY_VIT_KWARGS)
    assert [n for n, _ in timm_family.blocks(vit)] == ["blocks.0", "blocks.1"]
    x = timm_family.example_inputs(vit, 3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 32, 32)
    assert timm_family.forward(vit, x).shape == (3, 10)
    cfg = timm_family.data_config(vit)
    assert cfg.input_size == (3, 32, 32) and len(cfg.mean) == len(cfg.std) == 3
    swin = timm_family.create(TINY_SWIN, TINY_SWIN_KWARGS)
    assert [n for n, _ in timm_family.blocks(swin)] == ["layers.0.blocks.0", "layers.1.blocks.0"]
    assert timm_family.example_inputs(swin).shape == (1, 3, 56, 56)


def test_unknown_family_and_architecture():
    with pytest.raises(LowrankError, match="model family 'jax' is not supported; accepted: timm"):
        get_family("jax")
    with pytest.raises(LowrankError, match="unknown timm architecture 'vit_tinny_patch16_224'.*did you mean"):
        get_family("timm").create("vit_tinny_patch16_224", {})


def test_build_model_records_family_architecture_and_inferred_settings(vit_ckpt):
    kwargs = {k: v for k, v in TINY_VIT_KWARGS.items() if k != "num_classes"}
    built = build_model(vit_ckpt, TINY_VIT, kwargs)
    assert (built.family.name, built.architecture, built.manifest) == ("timm", TINY_VIT, None)
    assert built.model_kwargs["num_classes"] == 10  # read from the checkpoint's head
    assert not built.model.training
