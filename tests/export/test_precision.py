"""16-bit copies of factorized models (export/precision.py, cast_factorized, the 16-bit checks of the dense, safetensors and
hf exports).

A tiny Llama (tied head, pretrained a few steps so that its argmaxes are decided) is factorized; its pairs are then
scaled badly on purpose (`up·2^k`, `down·2^-k`: the same model in exact arithmetic), which a plain float16 cast ruins
(the down halves flush to subnormals or zero, the up halves overflow) and the balanced cast keeps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import one_line_error
from hf_models import hub_model
from transformers import AutoTokenizer

import lowrank_cli.pipelines.export as export_pipeline
from lowrank_cli.data.text import pydoc_documents
from lowrank_cli.errors import LowrankError
from lowrank_cli.export.cast import cast_factorized, cast_tensors
from lowrank_cli.export.precision import balance_factors, pair_balance, require_representable, text_inputs, text_rows
from lowrank_cli.export.verify import compare_outputs
from lowrank_cli.io.manifest import read_checkpoint, save_factorized
from lowrank_cli.io.safetensors import read_header
from lowrank_cli.models import load
from lowrank_cli.models.family import get_family
from lowrank_cli.pipelines.export import export_checkpoint
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe

SKEW = 20  # 2^20: a down half of ~0.05 becomes ~5e-8 (below float16's smallest subnormal), an up half of ~0.1 about 1e5 (> 65504)


@pytest.fixture(scope="module")
def factorized(tmp_path_factory) -> Path:
    """A tiny tied Llama (pretrained 30 steps) factorized by plain SVD at uniform ranks: its Hub folder."""
    root = tmp_path_factory.mktemp("precision")
    recipe = load_recipe("causal-lm")
    recipe = recipe.model_copy(update={"factorize": recipe.factorize.model_copy(update={"method": "svd", "allocation": "uniform"})})
    return factorize_checkpoint(hub_model(root, "llama-tied", pretrain_steps=30), recipe, root / "llama.lowrank").out


def _skewed(tensors: dict, layers: dict, k: int = SKEW) -> dict:
    """The same model with every pair scaled apart by 2^k (exactly the same products in float32)."""
    out = dict(tensors)
    for name in layers:
        out[f"{name}.up.weight"] = tensors[f"{name}.up.weight"] * 2.0 ** k
        out[f"{name}.down.weight"] = tensors[f"{name}.down.weight"] * 2.0 ** -k
    return out


@pytest.fixture(scope="module")
def skewed(factorized, tmp_path_factory) -> Path:
    """`factorized` with badly scaled pairs, saved as a factorized Hub folder of its own (config and tokenizer copied)."""
    _, manifest, tensors = read_checkpoint(factorized)
    folder = tmp_path_factory.mktemp("skewed") / "llama.skewed"
    folder.mkdir()
    for f in factorized.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    save_factorized(folder / "model.safetensors", _skewed(tensors, manifest.layers), manifest)
    return folder


def _outputs(model, x):
    family = get_family("transformers")
    with torch.no_grad():
        return family.forward(model.float().eval(), x)


def _inputs(model, folder: Path):
    family = get_family("transformers")
    x = family.example_inputs(model, 2, generator=torch.Generator().manual_seed(0), seq_len=32)
    return text_inputs(x, AutoTokenizer.from_pretrained(str(folder)))


def test_balance_keeps_float32_outputs_bit_for_bit(factorized, skewed):
    """Balancing by powers of two changes no bit of the float32 outputs, and leaves each pair within a factor 2."""
    _, manifest, tensors = read_checkpoint(skewed)
    assert pair_balance(tensors, manifest.layers) > 2.0 ** (2 * SKEW - 8)  # the skew is there
    balanced = balance_factors(tensors, manifest.layers)
    assert pair_balance(balanced, manifest.layers) <= 2.0
    assert any(not torch.equal(balanced[k], tensors[k]) for k in tensors)
    model = load(skewed)
    x = _inputs(model, skewed)
    before = _outputs(model, x)
    model.load_state_dict(balanced, strict=False)
    assert torch.equal(_outputs(model, x), before)
    assert (before - _outputs(load(factorized), x)).abs().max() <= 1e-5 * before.abs().max()  # the skew itself: float32 rounding only


def test_unmended_fp16_cast_fails_and_the_balanced_one_holds(skewed):
    """The miniature failure: a plain float16 cast of badly scaled pairs is far off (flushed downs, overflowed ups);
    cast_factorized's is within the 16-bit tolerance and keeps the top-1."""
    _, manifest, tensors = read_checkpoint(skewed)
    model = load(skewed)
    x = _inputs(model, skewed)
    want = _outputs(model, x)
    results = {}
    casts = {"plain": cast_tensors(tensors, torch.float16), "mended": cast_factorized(tensors, manifest.layers, torch.float16)}
    for name, cast in casts.items():
        copy = load(skewed)
        copy.load_state_dict({k: v.float() for k, v in cast.items()}, strict=False)
        results[name] = compare_outputs([(_outputs(copy, x), want)], low_precision=True)
    assert not results["plain"]["passed"]
    assert results["mended"]["passed"] and results["mended"]["relative_diff"] < 1e-2, results["mended"]
    assert cast_factorized(tensors, manifest.layers, torch.float16)["model.norm.weight"].dtype == torch.float16


@pytest.mark.parametrize("fmt", ["safetensors", "hf"])
def test_fp16_export_refused_unmended_and_written_mended(skewed, tmp_path, monkeypatch, fmt):
    """The safetensors and hf exports check a float16 copy's outputs: with the cast of old (every tensor alone) the
    skewed checkpoint is refused and nothing is written; with cast_factorized it is written and loads close."""
    out = tmp_path / f"copy-{fmt}"
    out = out.with_suffix(".safetensors") if fmt == "safetensors" else out
    with monkeypatch.context() as m:
        m.setattr(export_pipeline, "cast_factorized", lambda tensors, layers, dtype: cast_tensors(tensors, dtype))
        with pytest.raises(LowrankError, match="differs from the factorized model"):
            export_checkpoint(skewed, fmt, out, dtype="float16")
    assert list(tmp_path.iterdir()) == []
    res = export_checkpoint(skewed, fmt, out, dtype="float16")
    v = res.verification
    assert v["passed"] and v["inputs"] == "text" and v["relative_diff"] < 1e-2 and v["top1_agreement"] >= 0.99, v
    assert res.dtype == "float16"
    if fmt == "safetensors":
        assert {t.dtype for t in read_header(out).tensors.values()} == {"F16"}


def test_dense_bf16_export_checked_on_text(factorized, tmp_path):
    """A 16-bit dense copy of a text model with a tokenizer is checked on real text; its float32 export on random ids."""
    low = export_checkpoint(factorized, "dense", tmp_path / "bf16", dtype="bfloat16")
    full = export_checkpoint(factorized, "dense", tmp_path / "fp32")
    assert low.verification["passed"] and low.verification["inputs"] == "text"
    assert full.verification["inputs"] == "random" and full.verification["relative_diff"] < 5e-4


def test_text_rows_are_real_text(factorized):
    """The rows are CPython's help topics tokenized by the model's tokenizer, each from a paragraph's beginning; the example
    inputs' shape and other keys are kept, every position attended."""
    tokenizer = AutoTokenizer.from_pretrained(str(factorized))
    rows = text_rows(tokenizer, 2, 24)
    assert rows.shape == (2, 24) and not torch.equal(rows[0], rows[1])
    docs = pydoc_documents().texts
    decoded = [tokenizer.decode(r) for r in rows]
    assert all(any(d.startswith(text[:40].strip()) for d in docs) for text in decoded), decoded
    example = {"input_ids": torch.zeros(2, 24, dtype=torch.long), "attention_mask": torch.zeros(2, 24, dtype=torch.long)}
    x = text_inputs(example, tokenizer, seed=1)
    assert x["input_ids"].shape == (2, 24) and bool(x["attention_mask"].all()) and not torch.equal(x["input_ids"], rows)
    assert text_inputs({"pixel_values": torch.zeros(1, 3, 8, 8)}, tokenizer) is None
    assert text_rows(tokenizer, 1, 10 ** 6) is None


def test_text_check_still_fails_real_errors(factorized):
    """What the text check refuses: a copy whose factors are rounded to 8 bits (float8 e5m2: two mantissa bits), or one
    layer's pair lost (up zeroed). Both are refused on text, as on random ids."""
    _, manifest, tensors = read_checkpoint(factorized)
    model = load(factorized)
    family = get_family("transformers")
    random_x = family.example_inputs(model, 2, generator=torch.Generator().manual_seed(0), seq_len=32)
    text_x = _inputs(model, factorized)
    layer = sorted(manifest.layers)[0]
    wrong = {"float8": {k: v.to(torch.float8_e5m2).float() for k, v in tensors.items()},
             "lost pair": {**tensors, f"{layer}.up.weight": torch.zeros_like(tensors[f"{layer}.up.weight"])}}
    for name, bad in wrong.items():
        copy = load(factorized)
        copy.load_state_dict(bad, strict=False)
        for x in (random_x, text_x):
            v = compare_outputs([(_outputs(copy, x), _outputs(model, x))], low_precision=True)
            assert not v["passed"], (name, v)


def test_fp16_beyond_range_is_one_line_error(factorized, tmp_path, cli):
    """A tensor float16 cannot hold (here a norm weight of 1e5) is refused in one line naming it and the dtypes accepted;
    nothing is written."""
    _, manifest, tensors = read_checkpoint(factorized)
    folder = tmp_path / "big"
    folder.mkdir()
    for f in factorized.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    save_factorized(folder / "model.safetensors", {**tensors, "model.norm.weight": tensors["model.norm.weight"] * 1e5}, manifest)
    with pytest.raises(LowrankError, match="model.norm.weight"):
        require_representable({"model.norm.weight": torch.full((2,), 1e5)}, torch.float16, "x")
    require_representable({"model.norm.weight": torch.full((2,), 1e5)}, torch.bfloat16, "x")
    for fmt, out in (("safetensors", tmp_path / "out.safetensors"), ("dense", tmp_path / "out-dense"), ("hf", tmp_path / "out-hf")):
        r = cli("export", folder, "--format", fmt, "--out", out, "--dtype", "float16")
        one_line_error(r, "model.norm.weight", "65504", "bfloat16")
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]
