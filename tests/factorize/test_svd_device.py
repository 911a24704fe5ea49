"""The SVDs run on the command's device (issue 18): `--device cpu` on a GPU machine stays on the CPU, `cuda:1` is cuda:1."""

import contextlib
import importlib

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS, calibration, tiny_recipe, tiny_vit

from lowrank_cli.decompose.svd import svd, svd_device
from lowrank_cli.distill.distributed import DistEnv
from lowrank_cli.factorize import factorize_model
from lowrank_cli.models import get_family
from lowrank_cli.recipe import load_recipe

fm = importlib.import_module("lowrank_cli.factorize.model")


@pytest.fixture
def seen(monkeypatch):
    """The devices asked of every SVD / whitened / ASVD basis that factorization computes (each then computed on the CPU)."""
    devices = []
    real_svd, real_white, real_asvd = fm.svd, fm.whitened_basis, fm.asvd_basis

    def rec(device):
        devices.append(None if device is None else torch.device(device))

    monkeypatch.setattr(fm, "svd", lambda w, device=None: rec(device) or real_svd(w, "cpu"))
    monkeypatch.setattr(fm, "whitened_basis", lambda w, g, floor=1e-6, device=None: rec(device) or real_white(w, g, floor, "cpu"))
    monkeypatch.setattr(fm, "asvd_basis", lambda w, m, alpha=0.5, device=None: rec(device) or real_asvd(w, m, alpha, "cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: the old default was cuda:0 whatever the command said
    monkeypatch.setattr(fm, "on_device", lambda model, device: rec_move(device) or contextlib.nullcontext(model))  # no GPU here: stays put
    moved.clear()
    return devices


moved: list = []  # the devices `factorize_model` asked the model to move to for its calibration passes (None: not moved)


def rec_move(device):
    moved.append(None if device is None else torch.device(device))


def test_svd_device_is_the_given_device():
    assert svd_device("cpu") == torch.device("cpu") and svd_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    U, S, Vh = svd(torch.randn(6, 4), "cpu")
    assert U.device.type == "cpu" and S.shape == (4,)


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_factorize_model_runs_every_svd_on_the_given_device(seen, device):
    model = tiny_vit()
    factorize_model(model, load_recipe("deit"), family=get_family("timm"), device=device)
    assert len(seen) == 8 and set(seen) == {torch.device(device)}  # 2 blocks × (qkv, proj, fc1, fc2)
    assert moved == [None]  # plain SVD runs no calibration pass: the model stays where it is


@pytest.mark.parametrize("method", ["whitened", "asvd"])
def test_data_aware_bases_on_the_given_device(seen, method):
    model = tiny_vit()
    r = load_recipe("deit")
    r = r.model_copy(update={"factorize": r.factorize.model_copy(update={"method": method})})
    factorize_model(model, r, family=get_family("timm"), calibration=calibration("synthetic", model, 4, 2), device="cuda:1")
    assert len(seen) == 8 and set(seen) == {torch.device("cuda", 1)}
    assert moved == [torch.device("cuda", 1)]  # the calibration passes (statistics) on the command's device too


def test_on_device_leaves_a_model_where_it_is_already_or_on_meta():
    model = tiny_vit()
    with fm.on_device(model, torch.device("cpu")) as m:  # already there: nothing moves
        assert m is model
    with fm.on_device(model, None):
        pass
    meta = torch.nn.Linear(2, 2, device="meta")
    with fm.on_device(meta, torch.device("cpu")):  # a skeleton's parameters stay on meta
        assert meta.weight.device.type == "meta"
    assert next(model.parameters()).device.type == "cpu"  # the round trip to a GPU: tests/gpu/test_cuda.py


def test_compress_factorizes_on_the_process_device(tmp_path, vit_ckpt, monkeypatch):
    """prepare_compress: the command's device; under torchrun this process's GPU (DistEnv), never cuda:0 for all."""
    import lowrank_cli.pipelines.common.prepare as pc

    asked = []
    real = pc.factorize_model
    monkeypatch.setattr(pc, "factorize_model", lambda *a, device=None, **k: asked.append(device) or real(*a, device="cpu", **k))
    monkeypatch.setattr(pc, "from_main", lambda env, value: value)  # rank 0 of 2 without a process group: it factorizes
    monkeypatch.setattr(pc, "on_main_alone", lambda env, what: contextlib.nullcontext())
    recipe = load_recipe(str(tiny_recipe(tmp_path)))
    pc.prepare_compress(vit_ckpt, recipe, out=tmp_path / "a", device="cpu")
    pc.prepare_compress(vit_ckpt, recipe, out=tmp_path / "b", device="cpu", env=DistEnv(0, 2, 1, torch.device("cuda", 1)))
    assert asked == [torch.device("cpu"), torch.device("cuda", 1)]
    assert not (tmp_path / "a").exists()


def test_factorize_checkpoint_svds_on_the_cpu_when_asked(seen, tmp_path, vit_ckpt):
    from lowrank_cli.pipelines.factorize import factorize_checkpoint

    factorize_checkpoint(vit_ckpt, load_recipe("deit"), tmp_path / "f.safetensors", TINY_VIT, TINY_VIT_KWARGS, device="cpu")
    assert len(seen) == 8 and set(seen) == {torch.device("cpu")}
