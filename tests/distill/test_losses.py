"""The PELA losses: values on known tensors, gradients to the factors and none to the teacher."""

import copy

import pytest
import timm
import torch
from conftest import TINY_SWIN, TINY_SWIN_KWARGS, tiny_vit

from lowrank_cli.distill.losses import BlockOutputs, base_loss, factorized_pairs, feature_distill_loss, weight_perturbation_loss
from lowrank_cli.distill.objective import DistillationObjective
from lowrank_cli.factorize import factorize_model
from lowrank_cli.models import get_family
from lowrank_cli.nn import LowRankLinear
from lowrank_cli.recipe import DistillConfig, Recipe

TIMM = get_family("timm")


def _pair():
    teacher = tiny_vit()
    student = copy.deepcopy(teacher)
    factorize_model(student, Recipe().with_kappa(3))
    return student.train(), teacher


def test_feature_distill_loss_is_mean_over_blocks_of_mse():
    s = [torch.zeros(2, 3, 4), torch.ones(2, 3, 4)]
    t = [torch.ones(2, 3, 4), torch.ones(2, 3, 4) * 3]
    torch.testing.assert_close(feature_distill_loss(s, t), torch.tensor((1.0 + 4.0) / 2))


def test_rwp_forms_on_known_delta():
    layer = LowRankLinear(2, 2, 1, bias=False)
    with torch.no_grad():
        layer.down.weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.up.weight.copy_(torch.tensor([[1.0], [0.0]]))
    dense = torch.tensor([[1.0, 0.0], [0.0, 0.5]])  # ΔW = up·down − W has max |.| = 0.5
    pairs = [(layer, dense)]
    torch.testing.assert_close(weight_perturbation_loss(pairs, 0.1, "paper"), torch.tensor(0.4))
    torch.testing.assert_close(weight_perturbation_loss(pairs, 0.1, "squared"), torch.tensor(0.16))
    torch.testing.assert_close(weight_perturbation_loss(pairs, 0.1, "hinge"), torch.tensor(0.4))
    # inside the ε-ball: the hinge is 0 and pulls nowhere; the squared form still pushes ΔW up
    assert weight_perturbation_loss(pairs, 0.7, "hinge").item() == 0.0
    torch.testing.assert_close(weight_perturbation_loss(pairs, 0.7, "squared"), torch.tensor(0.04))
    torch.testing.assert_close(weight_perturbation_loss(pairs, 0.7, "paper"), torch.tensor(-0.2))


def test_base_loss_kinds():
    logits, labels = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    torch.testing.assert_close(base_loss("ce", logits, labels, None), torch.nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(base_loss("logits", logits, None, torch.tensor([[1.0, 1.0]])), torch.tensor(1.0))
    assert base_loss("none", logits, labels, None).item() == 0.0


@pytest.mark.parametrize("term", ["base", "fd", "rwp"])
def test_each_term_reaches_the_factors_and_never_the_teacher(term):
    student, teacher = _pair()
    cfg = DistillConfig(alpha=1.0 if term == "fd" else 0.0, beta=1.0 if term == "rwp" else 0.0, epsilon=0.0)
    objective = DistillationObjective(student, teacher, cfg, base="ce" if term == "base" else "none", family=TIMM)
    # a perturbed student so that every term is non-zero (the SVD student's fd is already > 0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.manual_seed(0)
    loss, terms = objective(student, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert terms[term].item() > 0
    loss.backward()
    factors = [m for m in student.modules() if isinstance(m, LowRankLinear)]
    assert len(factors) == 8
    for m in factors:
        assert m.down.weight.grad is not None and m.down.weight.grad.abs().sum() > 0
        assert m.up.weight.grad is not None and m.up.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    objective.close()


def test_one_student_forward_per_step_and_hooks_removed():
    student, teacher = _pair()
    calls = []
    student.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    objective = DistillationObjective(student, teacher, DistillConfig(), base="ce", family=TIMM)
    objective(student, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert len(calls) == 1
    objective.close()
    assert all(not b._forward_hooks for _, b in TIMM.blocks(student))


def test_swin_blocks_are_captured_with_spatial_features():
    torch.manual_seed(0)
    swin = timm.create_model(TINY_SWIN, pretrained=False, **TINY_SWIN_KWARGS).eval()
    names = [n for n, _ in TIMM.blocks(swin)]
    assert names == ["layers.0.blocks.0", "layers.1.blocks.0"]
    hooks = BlockOutputs(TIMM.blocks(swin))
    swin(torch.randn(2, 3, 56, 56))
    feats = hooks.take()
    assert [tuple(f.shape) for f in feats] == [(2, 14, 14, 16), (2, 7, 7, 32)]  # (B, H, W, C)
    student = copy.deepcopy(swin)
    factorize_model(student, Recipe().with_kappa(2))
    objective = DistillationObjective(student.train(), swin, DistillConfig(beta=1.0, epsilon=0.0), base="logits", family=TIMM)
    loss, terms = objective(student, torch.randn(2, 3, 56, 56), None)
    assert set(terms) == {"base", "fd", "rwp"} and terms["fd"].item() > 0 and terms["rwp"].item() > 0
    loss.backward()
    assert all(m.down.weight.grad is not None for m in student.modules() if isinstance(m, LowRankLinear))


def test_factorized_pairs_point_at_the_teachers_dense_weights():
    student, teacher = _pair()
    pairs = factorized_pairs(student, teacher)
    assert len(pairs) == 8
    assert pairs[0][1].data_ptr() == teacher.blocks[0].attn.qkv.weight.data_ptr()  # the teacher's own tensor, not a copy


def test_noisy_tokens_replace_inner_tokens_from_the_batch_and_leave_the_input_alone():
    from lowrank_cli.distill.losses import noisy_tokens

    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (8, 50))
    ids[:, 0], mask = 101, torch.ones(8, 50, dtype=torch.long)
    for row, length in enumerate([50, 40, 30, 20, 10, 5, 2, 1]):
        mask[row, length:] = 0
        ids[row, length:] = 0  # padding
        ids[row, length - 1] = 102
    inputs = {"input_ids": ids, "attention_mask": mask}
    before = ids.clone()
    out = noisy_tokens(inputs, 0.2)
    assert torch.equal(inputs["input_ids"], before) and out["attention_mask"] is mask  # the batch given is unchanged
    changed = out["input_ids"] != ids
    inner = mask.bool().clone()
    inner[:, 0] = False
    inner[torch.arange(8), mask.sum(1) - 1] = False
    assert not (changed & ~inner).any()  # never the first or last token of a document, never padding
    assert 0.1 < changed.sum() / inner.sum() < 0.25  # about a fifth (a drawn token may equal the one it replaces)
    assert set(out["input_ids"][inner].tolist()) <= set(ids[inner].tolist())  # drawn from the batch's own tokens
    assert torch.equal(noisy_tokens(inputs, 1e-9)["input_ids"], ids)


def test_noisy_tokens_without_an_attention_mask_treat_every_token_as_real():
    from lowrank_cli.distill.losses import noisy_tokens

    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 30))
    out = noisy_tokens({"input_ids": ids}, 0.3)
    changed = out["input_ids"] != ids
    assert "attention_mask" not in out and changed.any()  # noise applied, no mask invented
    assert not changed[:, 0].any() and not changed[:, -1].any()  # the first and last tokens stay
    assert 0.15 < changed.sum() / (4 * 28) < 0.4
