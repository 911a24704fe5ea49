import copy
import json

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS, calibration, manifest_of, model_args, one_line_error, tiny_vit
from PIL import Image
from torch import nn

import lowrank_cli
from lowrank_cli.decompose import asvd_scale, whitened_factors, whitening
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize import collect_input_stats, factorize_model, gram_groups
from lowrank_cli.nn import LowRankLinear
from lowrank_cli.recipe import recipe_from_dict


def _anisotropic_inputs(d_in: int, n: int, seed: int = 0) -> torch.Tensor:
    """Columns are inputs x (d_in × n) with correlated features and scales spanning 1e2."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    scales = torch.logspace(0, -2, d_in, dtype=torch.float64)  # eigenvalues span 1e4: above the 1e-6 floor
    return mix @ (scales[:, None] * torch.randn(d_in, n, generator=g, dtype=torch.float64))


def _out_err(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm((w.double() - up.double() @ down.double()) @ x))


@pytest.mark.parametrize("rank", [1, 4, 16, 31])
def test_whitened_is_the_best_rank_r_in_output_norm_and_never_worse_than_svd(rank):
    torch.manual_seed(0)
    w = torch.randn(48, 32, dtype=torch.float64)
    x = _anisotropic_inputs(32, 400)
    up, down, sigma = whitened_factors(w, x @ x.T, rank)
    assert up.shape == (48, rank) and down.shape == (rank, 32)
    # Eckart–Young on W X: the smallest possible ‖(W − W')X‖ at rank r
    optimum = float(torch.linalg.svdvals(w @ x)[rank:].pow(2).sum().sqrt())
    got = _out_err(w, up, down, x)
    assert got == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    # σ of W·S are those of W X: the dropped energy is the output error
    assert float(sigma[rank:].pow(2).sum().sqrt()) == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    plain = _out_err(w, U[:, :rank] * S[:rank], Vh[:rank], x)
    assert got <= plain * (1 + 1e-9)
    if rank < 31:
        assert got < 0.9 * plain  # on anisotropic inputs the gain is large, not rounding


def test_map_back_equals_the_explicit_inverse_of_the_whitening():
    torch.manual_seed(1)
    w = torch.randn(20, 12, dtype=torch.float64)
    x = torch.randn(12, 200, dtype=torch.float64) * torch.linspace(0.5, 2, 12, dtype=torch.float64)[:, None]
    g = x @ x.T
    up, down, _ = whitened_factors(w, g, 5)
    S = whitening(g)
    U, s, Vh = torch.linalg.svd(w @ S, full_matrices=False)
    explicit = (U[:, :5] * s[:5]) @ Vh[:5] @ torch.linalg.inv(S)  # W' = U_r Σ_r V_rᵀ S⁻¹
    torch.testing.assert_close(up @ down, explicit, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(S @ S.T, g, rtol=1e-10, atol=1e-8)
    # √ split evenly: up's column norms equal down's row norms
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1))


def test_singular_or_indefinite_gram_does_not_fail():
    torch.manual_seed(2)
    w = torch.randn(24, 16, dtype=torch.float64)
    x = torch.randn(16, 3, dtype=torch.float64) @ torch.randn(3, 50, dtype=torch.float64)  # inputs span 3 of 16 dims
    g = x @ x.T
    assert int(torch.linalg.matrix_rank(g)) == 3
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(g - 1e-9 * torch.eye(16, dtype=torch.float64))  # what Cholesky would do
    S = whitening(g - 1e-9 * torch.eye(16, dtype=torch.float64))  # rank-deficient and slightly indefinite
    assert torch.isfinite(S).all()
    up, down, sigma = whitened_factors(w, g, 3)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    # W X has rank 3: rank 3 reproduces the outputs on these inputs (up to the eigenvalue floor),
    # where plain SVD at rank 3 is far off
    U, S_, Vh = torch.linalg.svd(w, full_matrices=False)
    assert _out_err(w, up, down, x) < 1e-5 * float(torch.linalg.norm(w @ x))
    assert _out_err(w, U[:, :3] * S_[:3], Vh[:3], x) > 0.1 * float(torch.linalg.norm(w @ x))
    # an all-zero Gram (a layer that never saw input) falls back to plain SVD
    torch.testing.assert_close(whitening(torch.zeros(4, 4)), torch.eye(4, dtype=torch.float64))
    up0, down0, _ = whitened_factors(w, torch.zeros(16, 16), 4)
    U, S_, Vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(up0 @ down0, (U[:, :4] * S_[:4]) @ Vh[:4])


def test_asvd_scale_numbers():
    s = asvd_scale(torch.tensor([4.0, 1.0, 0.0]), alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 2e-6], dtype=torch.float64))
    torch.testing.assert_close(asvd_scale(torch.zeros(3)), torch.ones(3, dtype=torch.float64))


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_collect_input_stats_equals_gram_of_the_inputs():
    torch.manual_seed(3)
    model = _TwoLinears()
    batches = [torch.randn(2, 3, 6), torch.randn(5, 3, 6)]  # (batch, tokens, features)
    stats = collect_input_stats(model, ["a", "b"], batches)
    xa = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    xb = torch.cat([torch.relu(model.a(b)).reshape(-1, 5) for b in batches]).detach().double()
    torch.testing.assert_close(stats["a"].gram, xa.T @ xa, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["b"].gram, xb.T @ xb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["a"].abs_mean, xa.abs().mean(0), rtol=1e-6, atol=1e-6)
    assert stats["a"].rows == stats["b"].rows == 21
    assert not model.a._forward_pre_hooks  # hooks removed
    assert gram_groups(model, ["a", "b"], 6 * 6 * 8) == [["a"], ["b"]]
    assert gram_groups(model, ["a", "b"], 1 << 20) == [["a", "b"]]


def test_calibration_sources(tmp_path):
    model = tiny_vit()
    digits = calibration("digits", model, 40, 16)
    assert [b.shape for b in digits] == [(16, 3, 32, 32), (16, 3, 32, 32), (8, 3, 32, 32)]
    torch.testing.assert_close(torch.cat(digits), torch.cat(calibration("digits", model, 40, 16)))  # seeded
    assert float(torch.cat(digits).std()) > 0.1
    synth = calibration("synthetic", model, 5, 4)
    assert [b.shape for b in synth] == [(4, 3, 32, 32), (1, 3, 32, 32)]
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 24), (40 * i, 100, 200)).save(tmp_path / cls / f"{i}.png")
    folder = calibration(str(tmp_path), model, 4, 3)
    assert [b.shape for b in folder] == [(3, 3, 32, 32), (1, 3, 32, 32)]
    with pytest.raises(LowrankError, match="not a folder of images"):
        calibration(str(tmp_path / "nope"), model, 4, 3)


def test_whitened_model_splits_gram_passes_with_identical_result_and_beats_svd():
    model = tiny_vit()
    cal = calibration("synthetic", model, 24, 8)
    one = copy.deepcopy(model)
    factorize_model(one, recipe_from_dict({"factorize": {"method": "whitened", "kappa": 2}}), calibration=cal)
    split = copy.deepcopy(model)  # 1 MB: the fc2 Gram (256² fp64) and others go in separate passes
    factorize_model(split, recipe_from_dict({"factorize": {"method": "whitened", "kappa": 2, "calib_max_gram_mb": 1}}), calibration=iter(cal))
    plain = copy.deepcopy(model)
    factorize_model(plain, recipe_from_dict({"factorize": {"kappa": 2}}))
    names = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    stats = collect_input_stats(model, names, cal)
    for name in names:
        a, b, p = (m.get_submodule(name) for m in (one, split, plain))
        assert isinstance(a, LowRankLinear) and a.rank == p.rank
        torch.testing.assert_close(a.up.weight @ a.down.weight, b.up.weight @ b.down.weight)
        w, g = model.get_submodule(name).weight.detach().double(), stats[name].gram

        def err(m):
            d = w - (m.up.weight.double() @ m.down.weight.double()).detach()
            return float(torch.trace(d @ g @ d.T))

        assert err(a) <= err(p) * (1 + 1e-6)


def test_asvd_model_structure():
    model = tiny_vit()
    plans = factorize_model(model, recipe_from_dict({"factorize": {"method": "asvd", "kappa": 2}}), calibration=calibration("digits", model, 16, 16)).plans
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LowRankLinear) and (qkv.rank, qkv.down.weight.shape) == (24, (24, 64))
    assert sum(p.factorized for p in plans) == 8 and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_whitened_cli_manifest_and_load_match_in_memory(cli, vit_ckpt, tmp_path):
    recipe = tmp_path / "w.yaml"
    recipe.write_text("factorize:\n  method: whitened\n  kappa: 2\n")
    out = tmp_path / "vit.w.safetensors"
    r = cli("factorize", vit_ckpt, "--recipe", recipe, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS),
            "--calib-data", "synthetic", "--calib-samples", "16", "--out", out, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["allocation"] is None
    m = manifest_of(out)
    assert m["layers"]["blocks.0.attn.qkv"] == {"rank": 24, "d_in": 64, "d_out": 192, "bias": True, "rule": "kappa=2", "method": "whitened"}
    assert m["recipe"]["factorize"]["calib_data"] == "synthetic" and m["recipe"]["factorize"]["calib_samples"] == 16
    loaded = lowrank_cli.load(out)
    reference = tiny_vit()
    factorize_model(reference, recipe_from_dict({"factorize": {"method": "whitened", "kappa": 2}}), calibration=calibration("synthetic", reference, 16, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))
    # whitened without calibration data, or without an architecture: one line, nothing written
    bad = tmp_path / "bad.safetensors"
    one_line_error(cli("factorize", vit_ckpt, "--recipe", recipe, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--out", bad),
                    "factorize.method 'whitened' needs calibration data", "--calib-data")
    one_line_error(cli("factorize", vit_ckpt, "--recipe", recipe, "--calib-data", "digits", "--out", bad), "needs an architecture")
    one_line_error(cli("factorize", vit_ckpt, "--recipe", recipe, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS),
                        "--calib-data", str(tmp_path / "nowhere"), "--out", bad), "not a folder of images")
    one_line_error(cli("factorize", vit_ckpt, "--recipe", recipe, "--model", TINY_VIT, *model_args(TINY_VIT_KWARGS),
                        "--calib-data", "digits", "--calib-samples", "0", "--out", bad), "--calib-samples", code=2)
    assert not bad.exists()
