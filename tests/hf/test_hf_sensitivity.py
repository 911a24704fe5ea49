"""Sensitivity allocation on text models: GPT-2's Conv1D (a causal LM, sampled next tokens) and a BERT encoder
(features, Gaussian probes), with padded batches whose padding must not count."""

import pytest
import torch
from hf_models import hub_model

from lowrank_cli.data.calibration import text_calibration_batches
from lowrank_cli.factorize import factorize_model
from lowrank_cli.factorize.sensitivity import layer_sensitivity
from lowrank_cli.models import build_model
from lowrank_cli.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {kind: hub_model(root, kind) for kind in ("bert", "gpt2")}


@pytest.mark.parametrize("kind,exclude,layers", [("gpt2", ["lm_head"], 8), ("bert", ["pooler"], 12)])  # 2 blocks of 4 Conv1D / 6 linears
def test_text_models_count_real_tokens_and_allocate_at_uniform_kappas_parameters(hub, kind, exclude, layers):
    built = build_model(hub[kind])
    model, family = built.model, built.family
    batches = text_calibration_batches("pydoc", built.folder, 48, n_samples=12, batch_size=6)
    masks = [inputs["attention_mask"] for inputs, _labels in batches]
    assert any(bool((m == 0).any()) for m in masks)  # padded: the test means something
    real = sum(int(m.sum()) for m in masks)
    recipe = recipe_from_dict({"select": {"exclude": exclude}, "factorize": {"kappa": 2, "allocation": "sensitivity"}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [c.name for c in family.linear_candidates(model) if not any(e in c.name for e in exclude)]
    sens = layer_sensitivity(model, names, batches, task=family.task(model), call=family.forward)
    assert len(sens) == layers and all(st.rows == real and st.input_rows == real for st in sens.values())
    assert all(st.c > 0 and torch.isfinite(torch.tensor(st.c)) for st in sens.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if kind == "gpt2":
        assert {type(model.get_submodule(n)).__name__ for n in names} == {"Conv1D"}
    result = factorize_model(model, recipe, family=family, calibration=batches)
    alloc = result.allocation
    assert alloc.kappa == 2 and alloc.uniform_kappa == 2 and alloc.allocation == "sensitivity"
    assert alloc.sensitivity == pytest.approx({n: st.c for n, st in sens.items()})  # the same seeds, the same measurement
    widest = max(p.d_in + p.d_out for p in result.plans if p.rule is not None)  # one rank of the widest layer
    assert alloc.uniform_cost - widest < alloc.cost <= alloc.uniform_cost
    assert alloc.ranks != alloc.uniform_ranks


def test_long_text_batches_are_measured_in_micro_batches_with_the_same_sums(tmp_path, monkeypatch):
    """A calibration batch of text is cut into pieces of at most BACKWARD_TOKENS tokens for the backward pass (bounded
    memory); with a deterministic loss the statistics summed over the pieces equal those of the whole batch."""
    import lowrank_cli.factorize.sensitivity as sens_mod

    built = build_model(hub_model(tmp_path, "gpt2"))
    model, family = built.model.eval(), built.family
    batches = text_calibration_batches("pydoc", built.folder, 32, n_samples=12, batch_size=6)
    names = [c.name for c in family.linear_candidates(model) if "lm_head" not in c.name][:4]
    monkeypatch.setattr(sens_mod, "output_loss", lambda out, task, mask, g: (out.float() * mask[..., None]).sum())
    whole = layer_sensitivity(model, names, batches, task=family.task(model), call=family.forward)
    calls = []
    monkeypatch.setattr(sens_mod, "BACKWARD_TOKENS", 64)  # 2 examples of 32 tokens a piece
    pieces = layer_sensitivity(model, names, batches, task=family.task(model),
                               call=lambda m, x: calls.append(len(x["input_ids"])) or family.forward(m, x))
    assert max(calls) <= 2 and len(calls) >= 6
    for n in names:
        assert pieces[n].rows == whole[n].rows and pieces[n].input_rows == whole[n].input_rows
        assert pieces[n].grad_sq == pytest.approx(whole[n].grad_sq, rel=1e-5)
        assert pieces[n].input_sq == pytest.approx(whole[n].input_sq, rel=1e-5)
