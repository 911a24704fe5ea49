"""Evaluation cuts batches whose outputs would be too large (a causal LM's logits) into sub-batches: same figures."""

import importlib

import pytest
from hf_models import hub_model

from lowrank_cli.data.text import load_text_data
from lowrank_cli.models import build_model

ev = importlib.import_module("lowrank_cli.distill.evaluate")  # the module (the package exports its function)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_sub_batches_give_the_same_figures(tmp_path, monkeypatch, kind):
    folder = hub_model(tmp_path, kind)
    built = build_model(folder)
    model, family = built.model.eval(), built.family
    val = load_text_data("pydoc", built.folder, 32).val
    teacher = build_model(folder).model.eval()
    whole = ev.evaluate(model, val, family, batch_size=64, teacher=teacher)
    calls = []
    forward = family.forward
    monkeypatch.setattr(family, "forward", lambda m, x: calls.append(len(x["input_ids"])) or forward(m, x))
    monkeypatch.setattr(ev, "EVAL_OUTPUT_ELEMENTS", 3 * 32 * ev._output_width(model, family, val, "cpu"))
    cut = ev.evaluate(model, val, family, batch_size=64, teacher=teacher)
    assert max(calls) <= 3 and len(calls) > 2 * len(val) / 64  # the batches of 64 were cut to 3 rows at most
    assert cut.examples == whole.examples == len(val)
    for key, value in whole.to_dict().items():
        if isinstance(value, float):
            assert getattr(cut, key) == pytest.approx(value, rel=1e-5, abs=1e-6), key
