"""Every option and recipe value is range-checked where it is parsed; options without effect are said so."""

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_KWARGS, model_args, one_line_error, tiny_recipe
from safetensors.torch import save_file

TINY = (TINY_VIT, *model_args(TINY_VIT_KWARGS))


@pytest.mark.parametrize("args,needles,code", [
    (["inspect", "--model", *TINY, "--kappa", "inf"], ["'--kappa'", "finite number > 1 (got inf)"], 2),
    (["inspect", "--model", *TINY, "--kappa", "nan"], ["'--kappa'", "(got nan)"], 2),
    (["inspect", "--model", *TINY, "--kappa", "1e-320"], ["'--kappa'", "κ ≤ 1 would keep it at full size"], 2),
    (["inspect", "--model", *TINY, "--kappa", "1"], ["'--kappa'"], 2),
    (["compress", "CKPT", "--recipe", "RECIPE", "--nproc", "0"], ["'--nproc'"], 2),
    (["compress", "CKPT", "--recipe", "RECIPE", "--nproc", "-2"], ["'--nproc'"], 2),
    (["compress", "CKPT", "--recipe", "RECIPE", "--epochs", "0"], ["'--epochs'"], 2),
    (["evaluate", "CKPT", "--model", *TINY, "--data", "synthetic", "--batch-size", "0"], ["'--batch-size'"], 2),
    (["evaluate", "CKPT", "--model", *TINY, "--data", "synthetic", "--device", "foo"], ["--device 'foo' is not a device", "auto, cpu, cuda or cuda:N"], 1),
    (["compress", "CKPT", "--recipe", "RECIPE", "--device", "tpu"], ["--device 'tpu' is not a device"], 1),
    (["export", "CKPT", "--img-size", "0"], ["'--img-size'"], 2),
    (["bench", "CKPT", "--repeats", "0"], ["'--repeats'"], 2),
    (["inspect", "CKPT", "--model", TINY_VIT, *model_args({**TINY_VIT_KWARGS, "embed_dim": 0})], ["cannot be built", "ZeroDivisionError"], 1),
    (["factorize", "CKPT", "--model", *TINY, "--calib-data", "digits"], ["--calib-data has no effect with factorize.method 'svd'"], 1),
    (["factorize", "CKPT", "--model", *TINY, "--calib-samples", "8"], ["--calib-samples has no effect"], 1),
    (["export", "CKPT", "--format", "dense", "--opset", "17"], ["--opset applies to the onnx format only"], 1),
    (["export", "CKPT", "--format", "dense", "--max-shard-size", "5XB"], ["--max-shard-size '5XB' is not a size", "'500MB'"], 1),
    (["export", "CKPT", "--max-shard-size", "1MB"], ["--max-shard-size applies to the dense format only, not onnx"], 1),
])
def test_bad_options_are_one_line(cli, tmp_path, vit_ckpt, args, needles, code):
    args = [str(vit_ckpt) if a == "CKPT" else str(tiny_recipe(tmp_path)) if a == "RECIPE" else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(cli(*args), *needles, code=code)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("text,needles", [
    ("distill:\n  lr: 1.0e+300\n", ["distill.lr: Input should be less than or equal to 10"]),
    ("distill:\n  lr: .inf\n", ["distill.lr: Input should be a finite number"]),
    ("factorize:\n  kappa: .nan\n", ["factorize.kappa: Input should be a finite number"]),
    ("select:\n  overrides: [{pattern: qkv, kappa: 0.5}]\n", ["select.overrides.0.kappa: Input should be greater than 1"]),
])
def test_bad_recipe_values_write_nothing(cli, tmp_path, vit_ckpt, text, needles):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {TINY_VIT}\n" + text)
    out = tmp_path / "run"
    one_line_error(cli("compress", vit_ckpt, "--recipe", recipe, "--out", out, "--device", "cpu"), str(recipe), *needles)
    assert not out.exists()


def test_a_recipe_that_is_not_utf8(cli, tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: caf\xe9\n".encode("latin-1"))
    one_line_error(cli("inspect", "--model", *TINY, "--recipe", recipe), str(recipe), "a recipe must be UTF-8 text (byte 9 is not)")
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    one_line_error(cli("inspect", "--model", *TINY, "--recipe", folder), str(folder), "is a folder, expected a YAML recipe file")


def test_inspect_refuses_what_factorize_refuses(cli, tmp_path, vit_ckpt):
    recipe = tmp_path / "w.yaml"
    recipe.write_text("factorize:\n  method: whitened\n")
    for command in ("inspect", "factorize"):
        one_line_error(cli(command, vit_ckpt, "--model", *TINY, "--recipe", recipe, "--out" if command == "factorize" else "--json",
                           *([tmp_path / "o.safetensors"] if command == "factorize" else [])),
                       "factorize.method 'whitened' needs calibration data", "--calib-data")
    bert = tmp_path / "bert.safetensors"  # no timm architecture: weight-only, which cannot calibrate
    save_file({"encoder.layer.0.dense.weight": torch.randn(64, 32)}, str(bert))
    calibrated = tmp_path / "wc.yaml"
    calibrated.write_text("factorize:\n  method: whitened\n  calib_data: synthetic\n")
    for command in ("inspect", "factorize"):
        one_line_error(cli(command, bert, "--recipe", calibrated), "needs an architecture to run calibration data through", "--model")


def test_options_without_effect_on_a_factorized_checkpoint(cli, tmp_path, vit_ckpt):
    fact = tmp_path / "f.safetensors"
    assert cli("factorize", vit_ckpt, "--model", *TINY, "--out", fact).code == 0
    one_line_error(cli("inspect", fact, "--spectrum"), str(fact), "is already factorized", "--spectrum")
    r = cli("inspect", fact, "--kappa", "4", "--json")
    assert r.code == 0 and "already factorized: --kappa had no effect" in r.err
    r = cli("bench", fact, "--device", "cuda", "--threads", "2")
    assert "note: --threads sets CPU threads; it has no effect on the CUDA timings" in r.err
    if not torch.cuda.is_available():
        assert r.code == 1 and "CUDA is not available" in r.err.strip().splitlines()[-1]
